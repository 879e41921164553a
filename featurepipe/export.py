"""Export a saved model as one file that goes from pixels to classes without featurepipe.

``export(model, fmt=..., out=...)`` loads a ``.skops`` through ``featurepipe.predict`` (the one
model loader: without ``model``, the best row by CV through the checked implicit path,
``predict.load_default_model``; a ``model`` the user names is the user's choice, ``.skops`` or an
older ``.joblib``) and builds ONE graph (``build_graph``): uint8 RGB pixels at the model's input
size (``input_size``: its backbones' one size, or three times the largest when they differ, each
resized inside the graph) -> every
backbone with its own preprocessing, pooling (and flip averaging) -> per-block L2 normalisation ->
concatenation -> the scikit-learn model as graph ops (``featurepipe.heads``) -> class
probabilities (or decision scores, named as such). ``FORMATS`` (``featurepipe.export_formats``) maps a format name to its writer
and its runtime; a new format is one entry. The file is written with ``labels.txt`` and
``manifest.json`` beside it (classes, input size and resize, backbones with weights sha256, head,
outputs, versions, parity). A ``.tflite`` also gets TFLite metadata (labels, input normalization)
so MediaPipe's ImageClassifier and the TFLite Task Library load it as it is
(``featurepipe.tflite_metadata``).

Every export runs ``parity`` on the model's held-out (test-split) images; ``check(file)`` runs it
again on an exported file. See docs/export.md.
"""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from .errors import ImageError, UsageError
from .export_formats import FORMATS
from .parity import MAX_ACCURACY_LOSS, parity, summary

MANIFEST = "manifest.json"
LABELS = "labels.txt"
MANIFEST_FORMAT = "featurepipe-export/1"
# Backbones of different input sizes share one input this many times the largest, resized inside
# the graph: agrees with predict's own per-backbone reads more often than the largest size itself
# (docs/export.md, "One input for backbones of different sizes").
SHARED_INPUT_SCALE = 3


def input_size(sizes):
    """The exported input side S for backbones of input sizes ``sizes``: their one size, or
    ``SHARED_INPUT_SCALE`` x the largest when they differ."""
    sizes = set(int(s) for s in sizes)
    return sizes.pop() if len(sizes) == 1 else SHARED_INPUT_SCALE * max(sizes)


# --------------------------------------------------------------------------- the graph


def resize_pixels(pixels, size):
    """uint8 (n, S, S, 3) -> uint8 (n, size, size, 3): bilinear, rounded back to 0..255.

    The one resize a shared input uses inside the graph (and the parity check outside it), so both
    sides feed each backbone the same pixels."""
    import keras

    ops = keras.ops
    x = ops.image.resize(ops.cast(pixels, "float32"), (size, size), interpolation="bilinear")
    return ops.cast(ops.clip(ops.round(x), 0.0, 255.0), "uint8")


def _block_features(network, pixels, spec, size):
    """One backbone's features (n, D) from the shared uint8 input."""
    import keras

    ops = keras.ops
    x = pixels if spec.image_size == size else resize_pixels(pixels, spec.image_size)
    features = network(x)
    if spec.augment == "flip":
        features = ops.divide(ops.add(features, network(ops.flip(x, axis=2))), 2.0)
    return ops.divide(features, ops.maximum(ops.norm(features, axis=1, keepdims=True), 1e-12))


def build_graph(feature_models, head, *, size, output):
    """The whole classifier as one Keras model.

    Parameters
    ----------
    feature_models : list of featurepipe.engines.FeatureModel
        One per block, in the model's block order.
    head : callable
        float32 (n, D) joined features -> (n, C) (``featurepipe.heads.head_function``).
    size : int
        The input side S (``input_size`` of the backbones').
    output : str
        ``probabilities`` or ``scores``: the output layer's name.

    Returns
    -------
    keras.Model mapping uint8 (n, S, S, 3) RGB to float32 (n, C)
    """
    import keras

    from .engines import pixel_model

    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    networks = [pixel_model(m.backbone, m.spec, m.resolved) for m in feature_models]
    specs = [m.spec for m in feature_models]

    def classify(x):
        blocks = [_block_features(net, x, spec, size) for net, spec in zip(networks, specs)]
        joined = blocks[0] if len(blocks) == 1 else keras.ops.concatenate(blocks, axis=1)
        return keras.ops.cast(head(joined), "float32")

    out = keras.layers.Lambda(classify, name=output)(pixels)
    return keras.Model(pixels, out, name="featurepipe_classifier")


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the model file (or SavedModel folder), its manifest, and the manifest."""

    path: Path
    manifest_path: Path
    manifest: dict

    @property
    def passed(self):
        return bool(self.manifest.get("parity", {}).get("passed"))


def export(model=None, *, fmt="tflite", out=None, quantize=None, limit=None, engine="auto", quiet=False):
    """Export a saved model to one file, check it, and write the manifest beside it.

    Parameters
    ----------
    model : str or Path, optional
        A ``.skops`` saved by fit / compare (or an older ``.joblib``: the user's choice); default:
        the best row by CV (as predict chooses), its path and sha256 checked before it is loaded.
    fmt : str
        A key of ``FORMATS``.
    out : str or Path, optional
        Output folder; default ``<model's folder>/export/<model name>-<fmt>``.
    quantize : {None, "float16", "int8"}
        Smaller TFLite weights; refused when test accuracy drops by more than one point.
    limit : int, optional
        Check at most this many test images (default: all).
    engine : str
        The engine featurepipe's own side of the parity check uses.

    Returns
    -------
    ExportResult
    """
    form = _format(fmt)
    if quantize is not None and quantize not in form.quantize:
        raise UsageError(f"--quantize {quantize}: the {fmt} format takes "
                         f"{', '.join(form.quantize) or 'no quantization'}; use --format tflite "
                         f"--quantize float16 or int8, or leave --quantize out")
    source = _Source.load(model, engine=engine) if model is not None else _Source.default(engine=engine)
    model_path = source.path
    head, output = source.head()
    folder = Path(out) if out is not None else model_path.parent / "export" / f"{model_path.stem}-{fmt}"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; give a folder (it is created when missing)")
    source.check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_path.stem}{form.suffix}"
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    say(f"building the graph: {' + '.join(s.backbone for s in source.settings)} -> {source.clf} "
        f"({output}), input {source.size}x{source.size} uint8 RGB")
    graph = build_graph(source.feature_models(), head, size=source.size, output=output)
    representative = source.representative() if quantize == "int8" else None
    say(f"writing {path}")
    form.write(graph, path, quantize=quantize, representative=representative)
    (folder / LABELS).write_text("".join(f"{name}\n" for name in source.labels))
    metadata = _embed_metadata(path, source.labels) if form.metadata else {"embedded": False,
                                                                             "why": f"{fmt} has no metadata"}
    manifest = source.manifest(path, form, output=output, quantize=quantize, metadata=metadata)
    manifest_path = folder / MANIFEST
    _write_manifest(manifest_path, manifest)
    result = check(path, limit=limit, engine=engine, quiet=quiet, source=source)
    if quantize and not result.manifest["parity"].get("accuracy_ok", True):
        loss = result.manifest["parity"]["accuracy_change"]
        for written in (path, manifest_path, folder / LABELS):
            _remove(written)
        raise UsageError(f"--quantize {quantize} loses {-100 * loss:.1f} points of test accuracy "
                         f"(more than {100 * MAX_ACCURACY_LOSS:.0f}); export without --quantize "
                         f"or with --quantize float16")
    return result


def _format(fmt):
    if fmt == "onnx":
        raise UsageError("--format onnx is not written by this version; use --format tflite or savedmodel "
                         "(both hold the whole graph)")
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _remove(path):
    if Path(path).is_dir():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def _write_manifest(path, manifest):
    from .store import write_json_atomic

    write_json_atomic(path, manifest)


def _embed_metadata(path, labels):
    """TFLite metadata in the file: labels and input normalization (``featurepipe.tflite_metadata``)."""
    from .tflite_metadata import embed

    return embed(path, labels)


class _Source:
    """The saved model being exported: its bundle, settings, estimator, test images."""

    def __init__(self, model_path, loaded, engine):
        from .settings import ExtractionSettings

        self.path, self.loaded, self.engine = Path(model_path), loaded, engine
        self.bundle = loaded.bundle
        self.estimator = loaded.estimator
        self.clf = str(self.bundle.get("clf", type(self.estimator).__name__))
        self.settings = [ExtractionSettings.from_attrs(b["attrs"]) for b in self.bundle["blocks"]]
        self.size = input_size(s.image_size for s in self.settings)
        self.labels = [self.bundle["class_names"][int(c)] for c in self.estimator.classes_]
        reads = {(s.resize, s.decode) for s in self.settings}
        if len(reads) > 1:
            raise UsageError(f"the blocks of {self.path.name} were read with different --resize/--decode "
                             f"({', '.join(sorted(map('/'.join, reads)))}); one input needs one: extract "
                             "them with the same --resize and --decode")
        self.resize, self.decode = reads.pop()
        self._models = None

    @classmethod
    def load(cls, model_path, *, engine="auto", written_in=None, sha256=None):
        """A model file: the user's choice, or (``written_in`` and ``sha256``) one featurepipe wrote,
        checked before it is read (``featurepipe.predict.load_model``)."""
        from .predict import load_model

        loaded = load_model(model_path, engine=engine, written_in=written_in, sha256=sha256)
        return cls._of(model_path, loaded, engine)

    @classmethod
    def default(cls, *, engine="auto"):
        """The best row by CV of the latest run, loaded through predict's checked implicit path."""
        from .predict import load_default_model

        model_path, loaded = load_default_model(engine=engine)
        return cls._of(model_path, loaded, engine)

    @classmethod
    def _of(cls, model_path, loaded, engine):
        if not hasattr(loaded, "bundle"):
            raise UsageError(f"--model {model_path}: only a .skops from featurepipe fit/compare is exported "
                             "(a fine-tuned .keras is already one Keras file)")
        return cls(model_path, loaded, engine)

    def head(self):
        from .heads import NotExportable, head_function

        try:
            return head_function(self.estimator)
        except NotExportable as err:
            raise UsageError(f"cannot export '{self.clf}': {err}; no format featurepipe writes "
                             f"({', '.join(FORMATS)}) can take it (export a logreg, svm, svm-rbf, mlp, "
                             "nb or knn row)") from None

    def feature_models(self):
        """One FeatureModel per block (the weights checked against the recorded sha256)."""
        from .predict import feature_models

        if self._models is None:
            self._models = feature_models(self.bundle, engine=self.engine)
        return self._models

    def split_rows(self, split):
        """(paths, labels as class names) of the rows of ``split`` in the model's first feature file."""
        from .store import load

        f = load(self.bundle["blocks"][0]["file"], features=False)
        rows = np.flatnonzero(np.isin(f.split, split))
        root = self.data_root(f.attrs)
        return [str(root / f.paths[i]) for i in rows], [f.class_names[int(f.y[i])] for i in rows]

    def data_root(self, attrs=None):
        """The image folder the model's feature files were extracted from."""
        from .store import read_attrs

        attrs = attrs if attrs is not None else read_attrs(self.bundle["blocks"][0]["file"])
        root = str(attrs.get("data_root", ""))
        if not root:
            raise UsageError(f"the feature file of {self.path.name} records no image folder; extract it again")
        return Path(root)

    def check_output_folder(self, folder):
        from .paths import check_outside_input

        check_outside_input(self.data_root(), folder.resolve(), "--out")

    def representative(self, n=64):
        """Up to ``n`` training images at the input size (int8 calibration data)."""
        from .reader import Target, read_images

        paths, _ = self.split_rows(("train", "val"))
        step = max(1, len(paths) // n)
        reads = read_images(paths[::step][:n], [Target(self.size, self.resize, self.decode)])
        return [r.outputs[0] for r in reads if not isinstance(r, ImageError)]

    def manifest(self, path, form, *, output, quantize, metadata):
        from . import __version__
        from .backbones import file_sha256
        from .engines import tensorflow_version

        import keras
        import sklearn

        return {
            "format": MANIFEST_FORMAT,
            "file": path.name,
            "file_format": form.name,
            "runtime": form.runtime,
            "quantize": quantize or "none (float32)",
            "classes": self.labels,
            "input": {"name": "pixels", "shape": [None, self.size, self.size, 3], "dtype": "uint8",
                      "colour": "RGB", "range": [0, 255], "size": self.size, "resize": self.resize,
                      "decode": self.decode, "exif_orientation": "applied",
                      "resize_inside": {s.backbone: s.image_size for s in self.settings
                                        if s.image_size != self.size}},
            "backbones": [{"name": s.backbone, "layer": s.layer, "pooling": s.pooling, "image_size": s.image_size,
                           "preprocess": s.preprocess, "augment": s.augment, "weights_source": s.weights_source,
                           "weights_sha256": s.weights_sha256} for s in self.settings],
            "block_norm": "l2 per block, then concatenated",
            "head": {"clf": self.clf, "estimator": _describe(self.estimator),
                     "params": self.bundle.get("metrics", {}).get("best_params", "")},
            "outputs": {"name": output, "kind": output, "shape": [None, len(self.labels)],
                        "order": "classes"},
            "metadata": metadata,
            "source_model": {"path": str(self.path.resolve()), "sha256": file_sha256(self.path),
                             "features": self.bundle.get("features", "")},
            "versions": {"featurepipe": __version__, "tensorflow": tensorflow_version(),
                         "keras": keras.__version__, "scikit-learn": sklearn.__version__,
                         "python": sys.version.split()[0]},
        }


def _describe(estimator):
    """``CalibratedClassifierCV(Pipeline(StandardScaler, LinearSVC))``-style chain of types."""
    if hasattr(estimator, "calibrated_classifiers_"):
        return f"CalibratedClassifierCV(sigmoid, {_describe(estimator.calibrated_classifiers_[0].estimator)})"
    if hasattr(estimator, "steps"):
        inner = ", ".join(type(s).__name__ for _, s in estimator.steps if s not in (None, "passthrough"))
        return f"Pipeline({inner})"
    return type(estimator).__name__


# --------------------------------------------------------------------------- parity


def check(path, *, model=None, limit=None, engine="auto", quiet=False, source=None):
    """Run the parity check of an exported file against the model it came from; update its manifest.

    The model is the ``.skops`` the manifest names, loaded only when its sha256 is the one recorded
    at export (an implicit load: ``_manifest_source``), or ``model``, a file the user names.

    (a) Both sides fed the same decoded pixels at the exported input size (featurepipe: each
    backbone's pixels resized as the graph resizes them, its own feature models and estimator):
    top-1 equal on every image and max |Δ| <= ``MAX_ABS_DIFF`` for float32 exports.
    (b) From the image files, each side with its own reader: the exported file on the pixels the
    manifest names, featurepipe through ``predict``; top-1 agreement >= ``MIN_AGREEMENT``.

    Returns
    -------
    ExportResult
    """
    path = Path(path)
    manifest_path = path.parent / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--check {path}: no readable {MANIFEST} beside it; export the model again") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("file") != path.name:
        raise UsageError(f"--check {path}: {manifest_path} is not the manifest of this file")
    form = _format(manifest["file_format"])
    if source is None:
        source = _Source.load(model, engine=engine) if model is not None else _manifest_source(manifest, engine)
    paths, truth = source.split_rows(("test",))
    if limit is not None:
        paths, truth = paths[:limit], truth[:limit]
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    if not paths:
        manifest["parity"] = {"passed": False, "why": "no test rows in the model's feature file"}
    else:
        say(f"parity check on {len(paths)} test images ({form.runtime} vs featurepipe)")
        manifest["parity"] = parity(form.runner(path), source, paths, truth, form=form,
                                     float32=manifest.get("quantize", "").startswith("none"),
                                     output=manifest["outputs"]["kind"])
    _write_manifest(manifest_path, manifest)
    say(summary(manifest["parity"]))
    return ExportResult(path, manifest_path, manifest)


def _manifest_source(manifest, engine):
    """The model a manifest names, through the checked path: a ``.skops`` whose sha256 is the recorded one."""
    from .modelfile import MODEL_SUFFIX

    recorded = manifest.get("source_model") or {}
    path = Path(str(recorded.get("path", "")))
    if path.suffix.lower() != MODEL_SUFFIX:
        raise UsageError(f"--check: the manifest names '{path}', not a {MODEL_SUFFIX} file featurepipe checks "
                         "before loading; if you trust that file, pass it with --model")
    return _Source.load(path, engine=engine, written_in=path.parent, sha256=str(recorded.get("sha256", "")))


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(prog="featurepipe export",
                      description="Export a saved model as one file (pixels in, classes out) that runs without "
                                  "featurepipe, with labels and manifest.json beside it, and check it against "
                                  "featurepipe predict on the test images.")
    p.add_argument("--model", help="a .skops saved by fit/compare (or an older .joblib: a pickle, which runs "
                                   "any code it holds, so name only files you trust); default: the best row "
                                   "by CV of the latest run's results table, checked by sha256")
    p.add_argument("--format", dest="fmt", default="tflite",
                   help=f"file format: {', '.join(FORMATS)} (default tflite)")
    p.add_argument("--out", help="output folder (default <model's folder>/export/<model>-<format>)")
    p.add_argument("--quantize", choices=("float16", "int8"),
                   help="smaller TFLite weights; refused when test accuracy drops by more than 1 point")
    p.add_argument("--check", metavar="FILE", help="only run the parity check of an exported file again (against "
                                                   "the .skops its manifest names, sha256 checked, or --model)")
    p.add_argument("--limit", type=int, help="check at most this many test images (default: all)")
    p.add_argument("--engine", default="auto", help="featurepipe's engine in the check (auto, tf, litert)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.check:
        if not Path(args.check).exists():
            raise UsageError(f"--check {args.check}: no such file")
        result = check(args.check, model=args.model, limit=args.limit, engine=args.engine, quiet=args.quiet)
    else:
        result = export(args.model, fmt=args.fmt, out=args.out, quantize=args.quantize, limit=args.limit,
                        engine=args.engine, quiet=args.quiet)
    print(f"{result.path}\n{result.manifest_path}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
