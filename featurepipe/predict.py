"""Classify new image files with a saved model.

``predict(model_path, images)`` rebuilds every backbone the model was trained on from the
extraction settings stored in the model (refusing weights whose sha256 differs), extracts the
features of the images in streamed batches, applies the same per-block L2 normalisation, and
returns one ``Prediction`` per image. Unreadable images are reported, not fatal.

``load_model(path)`` is the one model loader: ``MODEL_KINDS`` maps a file suffix to a class
(``.skops`` from ``featurepipe.fit``, an older or the user's ``.joblib``, ``.keras`` from
``featurepipe.finetune``), each with ``predict_paths(paths) -> list[Prediction]``. A new kind of
model is one class and one entry. ``load_model(path, written_in=folder, sha256=...)`` is the
implicit load of a model featurepipe wrote (checked by ``featurepipe.modelfile`` first);
without ``written_in`` the file is the user's choice (``--model``).
"""

import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from .checks import check_at_least, check_workers
from .children import loky_workers_die_with_parent
from .csvcells import writer as csv_writer
from .errors import ImageError, UsageError
from .fit import join_blocks, resolve_feature_files
from .modelfile import check_written, load_user, load_written, written_path
from .images import expand_paths
from .reader import FILE_DECODE_DEFAULT, Target, read_images
from .settings import ExtractionSettings

CHUNK = 256


@dataclass(frozen=True)
class Prediction:
    """One image's answer.

    ``label`` is a class name, ``unknown`` (probability below ``min_prob``) or empty when the
    image could not be read (``error`` says why).
    """

    path: str
    label: str
    probability: float
    error: str = ""


def load_bundle(model_path, *, written_in=None, sha256=None):
    """A model bundle saved by ``featurepipe.fit``: checked (``modelfile.load_written``) when
    ``written_in`` names the models folder it must lie in, else the user's file (``load_user``)."""
    if written_in is not None:
        return load_written(model_path, folder=written_in, sha256=sha256)
    return load_user(model_path)


class FeaturesModel:
    """A ``.skops`` (or ``.joblib``) from ``featurepipe.fit``: the backbones rebuilt from their
    stored settings, then the scikit-learn classifier on their joined features.

    Attributes
    ----------
    bundle : dict
        As saved by fit (``model``, ``blocks``, ``class_names``, ...).
    estimator : the fitted scikit-learn classifier
    """

    def __init__(self, path, *, batch_size=32, engine="auto", workers=None, written_in=None, sha256=None):
        self.bundle = load_bundle(path, written_in=written_in, sha256=sha256)
        self.estimator = self.bundle["model"]
        self.batch_size, self.engine, self.workers = batch_size, engine, workers
        self._models = None

    def predict_paths(self, paths):
        """One Prediction per image file, in order (probability of the top class)."""
        if self._models is None:  # built on the first images, once
            self._models = feature_models(self.bundle, engine=self.engine)
        targets = [model.spec.target() for model in self._models]
        X, good, errors = _chunk_features(paths, self._models, targets, self.batch_size, self.workers)
        proba = self.estimator.predict_proba(X) if good else []
        answers = dict(zip(good, proba))
        classes = [self.bundle["class_names"][int(c)] for c in self.estimator.classes_]
        return [_answer(path, classes, answers.get(i), errors.get(i)) for i, path in enumerate(paths)]


class FinetunedModel:
    """A ``.keras`` from ``featurepipe.finetune`` (its ``.json`` beside it gives the class names,
    input size, resize and decode): images in, class probabilities out."""

    def __init__(self, path, *, batch_size=32, engine="auto", workers=None, written_in=None, sha256=None):
        from .finetune.model import load_finetuned

        if written_in is not None:
            check_written(path, folder=written_in, sha256=sha256)
        self.keras_model, meta = load_finetuned(path)
        self.class_names = list(meta["class_names"])
        self.target = Target(int(meta["image_size"]), meta.get("resize", "stretch"),
                             meta.get("attrs", {}).get("decode", FILE_DECODE_DEFAULT))
        self.batch_size, self.workers = batch_size, workers

    def predict_paths(self, paths):
        """One Prediction per image file, in order (probability of the top class)."""
        reads = list(read_images(paths, [self.target], workers=self.workers))
        errors = {i: str(r) for i, r in enumerate(reads) if isinstance(r, ImageError)}
        good = [i for i in range(len(paths)) if i not in errors]
        proba = [self.keras_model.predict(np.stack([reads[i].outputs[0] for i in good[s:s + self.batch_size]])
                                          .astype(np.float32), verbose=0)
                 for s in range(0, len(good), self.batch_size)]
        answers = dict(zip(good, np.concatenate(proba) if proba else []))
        return [_answer(path, self.class_names, answers.get(i), errors.get(i)) for i, path in enumerate(paths)]


MODEL_KINDS = {".skops": FeaturesModel, ".joblib": FeaturesModel, ".keras": FinetunedModel}


def load_model(model_path, *, batch_size=32, engine="auto", workers=None, written_in=None, sha256=None):
    """The model at ``model_path``, of the kind its suffix names (``MODEL_KINDS``).

    ``written_in`` (``models/<dataset>/``) and ``sha256`` (its results row's ``model_sha256``)
    make it an implicit load: the file must lie in that folder with that hash, else ModelRefused
    before it is read (``featurepipe.modelfile``). Without them the file is the user's choice.

    Returns
    -------
    FeaturesModel or FinetunedModel
        Anything with ``predict_paths(paths) -> list[Prediction]``.
    """
    path = Path(model_path)
    kind = MODEL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"--model {path}: unknown model kind '{path.suffix}'; give a "
                         f"{' or '.join(MODEL_KINDS)} file (saved by featurepipe.fit or featurepipe.finetune)")
    if not path.is_file():
        raise UsageError(f"model file not found: '{path}'")
    return kind(path, batch_size=batch_size, engine=engine, workers=workers, written_in=written_in, sha256=sha256)


def _answer(path, classes, proba, error):
    if error is not None:
        return Prediction(str(path), "", float("nan"), error)
    k = int(np.argmax(proba))
    return Prediction(str(path), classes[k], float(proba[k]))


def expand_images(items):
    """Image files from files and folders (folders walked as extract walks them)."""
    return [str(p) for p in expand_paths(items)]


def feature_models(bundle, *, engine="auto"):
    """One FeatureModel per block of the bundle, rebuilt from the settings its file recorded."""
    from .engines import rebuild_feature_model

    _check_tf_version(bundle)
    return [rebuild_feature_model(ExtractionSettings.from_attrs(b["attrs"]), engine=engine)
            for b in bundle["blocks"]]


def _check_tf_version(bundle):
    from .engines import tensorflow_version

    def same_spelling(version):  # tf.__version__ says 2.x.0-dev..., package metadata 2.x.0.dev...
        return version.replace("-", ".")

    made = {str(b["attrs"].get("tensorflow_version", "")) for b in bundle["blocks"]} - {""}
    here = tensorflow_version()
    if made and {same_spelling(v) for v in made} != {same_spelling(here)}:
        warnings.warn(f"the features were made with TensorFlow {', '.join(sorted(made))}, this is "
                      f"{here}: predictions may differ slightly", stacklevel=3)


def predict(model_path, images, *, min_prob=None, batch_size=32, engine="auto", workers=None):
    """Predict the class of each image.

    Parameters
    ----------
    model_path : str or Path
        A ``.skops`` saved by ``featurepipe.fit`` or a ``.keras`` from ``featurepipe.finetune``
        (see ``MODEL_KINDS``), or a model already loaded by ``load_model``.
    images : list of str or Path
        Image files and folders (searched recursively).
    min_prob : float, optional
        Answer ``unknown`` when the top probability is below it.

    Returns
    -------
    list of Prediction, in input order
    """
    return list(iter_predictions(model_path, images, min_prob=min_prob, batch_size=batch_size,
                                 engine=engine, workers=workers))


def iter_predictions(model_path, images, *, min_prob=None, batch_size=32, engine="auto", workers=None,
                     progress=False):
    """Like ``predict`` but yields Predictions as batches finish (``CHUNK`` images at a time, so
    memory does not grow with the number of images); ``progress`` shows a bar on stderr."""
    if min_prob is not None and not 0 <= min_prob <= 1:
        raise UsageError(f"--min-prob must be in [0, 1], got {min_prob}")
    check_at_least(batch_size, 1, "--batch-size")
    check_workers(workers)
    paths = expand_images(images)
    if not paths:
        raise UsageError("no image files given (files or folders of .jpg/.png/...)")
    model = (model_path if hasattr(model_path, "predict_paths")
             else load_model(model_path, batch_size=batch_size, engine=engine, workers=workers))
    with _progress(len(paths), progress) as bar:
        for start in range(0, len(paths), CHUNK):
            for pred in model.predict_paths(paths[start:start + CHUNK]):
                if min_prob is not None and not pred.error and pred.probability < min_prob:
                    pred = replace(pred, label="unknown")
                yield pred
            bar.update(min(CHUNK, len(paths) - start))


def _progress(total, show):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="img", disable=not show or None, file=sys.stderr,
                dynamic_ncols=True)


def _chunk_features(chunk, models, targets, batch_size, workers):
    """Features (n_good, D) of the readable images of ``chunk``, their indices, and errors.

    Each image is read once for every block (each read as its feature file was made).
    """
    reads = list(read_images(chunk, targets, workers=workers))
    errors = {i: str(r) for i, r in enumerate(reads) if isinstance(r, ImageError)}
    good = [i for i in range(len(chunk)) if i not in errors]
    if not good:
        return np.zeros((0, 0), np.float32), good, errors
    blocks = []
    for k, m in enumerate(models):
        feats = [m(np.stack([reads[i].outputs[k] for i in good[s:s + batch_size]]))
                 for s in range(0, len(good), batch_size)]
        blocks.append(np.concatenate(feats))
    return join_blocks(blocks), good, errors


# --------------------------------------------------------------------------- CLI


def default_row():
    """(models folder, results row) of the best row by CV (``featurepipe.results.ranked``) with a
    saved model, of the latest extract run's data set: what predict uses without ``--model``."""
    from .paths import models_dir_for
    from .results import can_be_chosen, current_rows, ranked, read_results

    folder = models_dir_for(resolve_feature_files(None)[0])
    for row in ranked(current_rows(read_results(folder), folder)):
        if can_be_chosen(row) and written_path(row.get("model") or "", folder).is_file():
            return folder, {**row, "model": str(written_path(row["model"], folder))}
    raise UsageError(f"no saved model in '{folder}'; run featurepipe compare first or pass --model")


def default_model():
    """The path of the model ``default_row`` names."""
    return Path(default_row()[1]["model"])


def load_default_model(*, batch_size=32, engine="auto", workers=None):
    """The model of ``default_row``, loaded only after its path and sha256 are checked."""
    folder, row = default_row()
    return row["model"], load_model(row["model"], batch_size=batch_size, engine=engine, workers=workers,
                                    written_in=folder, sha256=row.get("model_sha256"))


def build_parser():
    p = OneLineParser(prog="python -m featurepipe.predict",
                                description="Classify image files with a model saved by featurepipe.fit.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--model", help="a .skops saved by featurepipe.fit (or a fine-tuned .keras, or a .joblib: "
                                   "a pickle, which runs any code it holds, so name only files you trust); "
                                   "default: the best row by CV of the latest run's results table, checked by sha256")
    p.add_argument("--csv", metavar="OUT.csv", help="also write path,label,probability,error to this file "
                                                   "(row by row into a temporary file, renamed when complete)")
    p.add_argument("--min-prob", type=float, help="answer 'unknown' when the top probability is below this")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine", default="auto", help="forward-pass engine (auto, tf)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def one_line(text):
    """``text`` for one field of a stdout line: quoted and escaped (``repr``) when it holds a
    control character (a newline in a file name would otherwise split the line)."""
    text = str(text)
    return repr(text) if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text) else text


def _open_csv(path):
    """The temporary file the rows go to, line by line (``_finish_csv`` renames it into place), so
    a killed predict never leaves a truncated CSV under the name asked for."""
    from .store import remove_stale_temps

    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"--csv {path}: folder '{path.parent}' does not exist; create it or "
                         "pass a file in an existing folder")
    if path.is_dir():
        raise UsageError(f"--csv {path}: is a folder; pass a file name")
    remove_stale_temps(path.parent, prefix=f".{path.name}")  # left by a predict killed earlier
    try:
        return open(path.with_name(f".{path.name}.tmp-{os.getpid()}"), "w", newline="", buffering=1)
    except OSError as err:
        raise UsageError(f"--csv {path}: cannot write it ({err.strerror})") from None


def _finish_csv(out, path, complete):
    """Close the temporary CSV; rename it to ``path`` when every image was written, else remove it."""
    out.close()
    if complete:
        os.replace(out.name, path)
    else:
        Path(out.name).unlink(missing_ok=True)


def main(argv=None):
    with loky_workers_die_with_parent():  # any worker process a model starts dies with predict
        return _main(argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    missing = [item for item in args.images if not os.path.lexists(item)]
    if missing:  # a typo on the command line, not a bad image among many
        raise UsageError(f"no such file or folder: '{missing[0]}'"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model = args.model
    if model is None:
        path, model = load_default_model(batch_size=args.batch_size, engine=args.engine)
        print(f"model: {path} (the best row by CV of {Path(path).parent / 'results.csv'})",
              file=sys.stderr)
    out = _open_csv(args.csv) if args.csv else None
    n = n_bad = 0
    complete = False
    try:
        writer = csv_writer(out) if out else None
        if writer:
            writer.writerow(["path", "label", "probability", "error"])
        for pred in iter_predictions(model, args.images, min_prob=args.min_prob,
                                     batch_size=args.batch_size, engine=args.engine, progress=not args.quiet):
            n += 1
            n_bad += bool(pred.error)
            prob = "" if pred.error else f"{pred.probability:.4f}"
            print("\t".join(map(one_line, (pred.path, pred.label or "error", prob or pred.error))))
            if writer:
                writer.writerow([pred.path, pred.label, prob, pred.error])
        complete = True
    finally:
        if out:
            _finish_csv(out, args.csv, complete)
    print(f"{n} images, {n_bad} unreadable" + (f" -> {args.csv}" if args.csv else ""), file=sys.stderr)
    return 0



if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
