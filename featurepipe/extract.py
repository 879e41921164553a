"""Extract features: image folders -> one HDF5 file per frozen backbone.

``extract(data, backbones, ...)`` is the whole job; ``python -m featurepipe.extract`` only parses
arguments. Work is saved in chunks (``OUT/.<name>.parts/``) as it finishes, and the feature file
is assembled under a temporary name and renamed into place, so a run killed at any moment and
started again redoes only the unfinished chunks. A re-run on a grown folder extracts only the new
or edited images.
"""

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .assemble import ExtractResult, assemble, unchanged, untouched
from .backbones import BACKBONES, POOLING_MODES, PREPROCESS, get_backbone, list_layers
from .checks import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_at_least, check_seed, check_workers
from .chunks import collect_parts, run_chunks_on_dask, run_local
from .cli import OneLineParser
from .engines import DEFAULT_BATCH_SIZE, FeatureModel, engine_choices
from .errors import DataError, UsageError
from .images import check_class_sizes, list_images
from .paths import check_outside_input, default_out_dir, features_home, latest_pointer
from .planning import (OutputLock, existing_file, output_path, part_name, plan_file, prepare_parts_dir,
                       remove_leftovers, valid_part)
from .reader import DECODE_MODES, DEFAULT_DECODE, DEFAULT_MAX_PIXELS, RESIZE_MODES
from .settings import check_settings, make_spec, split_layers, with_layers
from .store import write_json_atomic
from .verify import EXTRACT_SAMPLE, verify

__all__ = ["DEFAULT_BACKBONES", "ExtractResult", "extract", "main", "output_path"]

# Chosen by CV on flowers5's training rows and time: the cheapest set within one standard error
# of the best CV of every measured set (docs/backbones.md, "The default backbones").
DEFAULT_BACKBONES = ("squeezenet", "efficientnet_lite0", "efficientnet_lite2")


@dataclass(frozen=True)
class Options:
    """Settings shared by every backbone of one run (the values ``extract`` was given)."""

    batch_size: int
    image_size: int
    layer: object  # a layer name, or several (one forward pass, one file per layer)
    pooling: str
    weights: str
    preprocess: str
    resize: str
    augment: str
    test_size: float
    val_size: float
    seed: int
    overwrite: bool
    engine: str
    quiet: bool
    max_pixels: int
    workers: int
    chunk_size: int
    verify: int  # rows re-extracted on the TF engine and compared at the end; 0: none
    dask: str  # tcp://HOST:8786 | local | local:N: chunks run as Dask tasks
    decode: str  # scaled | exact (see featurepipe.reader.DECODE_MODES)
    allow_outside: bool  # read CSV rows naming files outside the manifest's folder


def extract(data, backbones=DEFAULT_BACKBONES, *, out=None,
            batch_size=DEFAULT_BATCH_SIZE, image_size=None, layer=None, pooling="avg",
            weights=None, preprocess=None, resize="stretch", augment="none", test_size=0.2,
            val_size=0.0, seed=0, overwrite=False, engine="auto", quiet=False,
            max_pixels=DEFAULT_MAX_PIXELS, workers=None, chunk_size=None, verify=EXTRACT_SAMPLE,
            dask=None, decode=DEFAULT_DECODE, allow_outside=False):
    """Extract features of every image under ``data`` with each backbone.

    Parameters
    ----------
    data : str or Path
        Folder of class folders (optionally below ``train/val/test``) or a CSV manifest.
    backbones : list of str
        Registry names or ``file:PATH``.
    out : str or Path, optional
        Output folder; default ``data/features/<name of data>``.
    batch_size, image_size, layer, pooling, weights, preprocess, resize, augment, test_size,
    val_size, seed, overwrite, engine, quiet, max_pixels, workers, chunk_size, verify, dask,
    decode, allow_outside
        As the CLI options of the same names (``python -m featurepipe.extract --help``); ``layer``
        may be a list (one forward pass, one file per layer), ``verify`` the number of rows
        re-extracted at the end (0: none), ``dask`` an address (see ``featurepipe.distributed``).
        Every value the CLI refuses is refused here too (``UsageError``).

    Returns
    -------
    list of ExtractResult, one per feature file (per backbone, and per layer of ``layer=[...]``)
    """
    given = locals()
    opts = Options(**{name: given[name] for name in Options.__dataclass_fields__})
    backbones = list(backbones) if not isinstance(backbones, str) else [backbones]
    _validate(opts, backbones)
    out_dir, index = outputs_and_images(data, out, allow_outside=opts.allow_outside)
    check_class_sizes(index, test_size=opts.test_size, val_size=opts.val_size, warn=True)
    _check_same_dataset(out_dir, index.root)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder '{out_dir}' ({err.strerror or err}); "
                         "pass --out DIR in a writable place") from None
    with _dask_session(opts.dask):
        results = _extract_all(index, backbones, out_dir, opts)
    pointer = latest_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(pointer, {"data": str(index.root), "files": [str(r.path.resolve()) for r in results]})
    return results


def outputs_and_images(data, out=None, *, allow_outside=False):
    """(output folder, ImageIndex) of an extraction of ``data`` into ``out`` (None: the default).

    Outputs are never written inside the folder holding the images (the next run would list them
    as a class); a folder is checked before it is walked, and featurepipe's own feature folder
    (``data_home()/features``) is never listed, wherever it is."""
    what = "--out" if out is not None else "the default output folder"
    out_dir = Path(out) if out is not None else None
    if Path(data).is_dir():
        out_dir = out_dir or default_out_dir(data)
        check_outside_input(data, out_dir, what)
    own = [features_home()] if any(features_home().glob("*/*.h5")) else []  # feature files of other data sets
    index = list_images(data, exclude=[*own, *([out_dir] if out_dir else [])], allow_outside=allow_outside)
    folders = [Path(data)] if Path(data).is_dir() else index.images_folders()
    out_dir = out_dir or default_out_dir(data, images_folder=folders)
    for folder in folders:
        check_outside_input(folder, out_dir, what)
    return out_dir, index


def _check_same_dataset(out_dir, root):
    """Feature files of two data sets never share a folder (same folder name, other place)."""
    from .store import read_attrs

    for path in sorted(Path(out_dir).glob("*.h5")):
        try:
            other = str(read_attrs(path).get("data_root", ""))
        except OSError:
            continue  # not a feature file: extending it fails later with its own message
        if other and other != str(root):
            raise UsageError(f"'{out_dir}' holds the features of another data set ('{other}', in "
                             f"{path.name}), not '{root}'; pass --out DIR with a folder of another name to keep both "
                             "(its name also names the models folder, models/<name>)")


def _validate(opts, backbones):
    if not backbones:
        raise UsageError("no backbone given; pass --backbone NAME (see --list-backbones)")
    if len(set(backbones)) != len(backbones):
        raise UsageError("a backbone is named twice in --backbone")
    check_at_least(opts.batch_size, 1, "--batch-size")
    check_settings(pooling=opts.pooling, image_size=opts.image_size, resize=opts.resize,
                   augment=opts.augment, preprocess=opts.preprocess, decode=opts.decode)
    check_workers(opts.workers)
    check_seed(opts.seed)
    check_at_least(opts.chunk_size, 1, "chunk_size")
    check_at_least(opts.verify, 0, "verify")
    if not 0 <= opts.test_size < 1 or not 0 <= opts.val_size < 1 or opts.test_size + opts.val_size >= 1:
        raise UsageError(f"--test-size and --val-size must be in [0, 1) with a sum below 1 "
                         f"(got {opts.test_size} and {opts.val_size})")
    if opts.max_pixels < 1:
        raise UsageError(f"--max-pixels must be >= 1, got {opts.max_pixels}")
    if len(backbones) > 1 and (opts.weights or opts.layer):
        raise UsageError("--weights and --layer apply to one backbone; run one --backbone at a time")
    if len(_layers(opts)) > 1 and opts.dask is not None:
        raise UsageError("several --layer values run locally only; leave out --dask or give one --layer")
    for name in backbones:
        get_backbone(name, preprocess_mode=opts.preprocess)


def _layers(opts):
    """The layers asked for: ``(None,)`` for the backbone's default, else the names given."""
    if not opts.layer:
        return (None,)
    return (opts.layer,) if isinstance(opts.layer, str) else tuple(opts.layer)


def _extract_all(index, names, out_dir, opts):
    """Every backbone's file; each image is read and decoded once for all of them."""
    started = time.time()
    with contextlib.ExitStack() as locks:
        jobs = [_prepare(index, name, out_dir, opts, locks) for name in names]
        if opts.dask is not None:
            for job in jobs:
                run_chunks_on_dask(index, job, opts)
        else:
            run_local(index, jobs, opts)
        outputs = [(job, output) for job in jobs for output in job.outputs]
        results = [replace(_finish(index, job, output, opts, started), files_in_pass=len(outputs))
                   for job, output in outputs]
    for result, (_, output) in zip(results, outputs):
        if not opts.quiet:
            print(result.summary(), file=sys.stderr)
        _verify_written(result.path, output.spec, opts)
    return results


@dataclass(eq=False)  # found in its job's outputs by identity
class _Output:
    """One feature file of a job: (locked) path, plan and chunks of the images it still needs."""

    spec: object     # single-layer spec: what the file records
    path: Path
    old: object
    plan: object
    parts_dir: Path
    chunks: list     # (part file name, index positions) of all its pending images
    n_resumed: int   # pending images whose part an interrupted run left (not computed again)


@dataclass
class _Job:
    """One backbone's share of a run: one model (one forward pass) and a file per layer.

    ``todo`` holds the chunks to compute: ``(positions, saves)`` where ``saves`` lists
    ``(output, part name, positions)`` of the files still missing that part; all layers are
    computed for the positions, each file's part keeps only its own.
    """

    spec: object     # the model's spec (a layer tuple when several layers are read)
    model: object
    outputs: list
    todo: list
    n_pending: int   # images some file of this job needs
    engines_used: set = field(default_factory=set)  # names of the engines that computed new rows


def _prepare(index, name, out_dir, opts, locks):
    backbone = get_backbone(name, preprocess_mode=opts.preprocess)
    spec, resolved = make_spec(backbone, pooling=opts.pooling, image_size=opts.image_size,
                               resize=opts.resize, augment=opts.augment, weights=opts.weights,
                               decode=opts.decode)
    multi = with_layers(spec, _layers(opts))
    layer_specs = split_layers(multi)
    model_spec = layer_specs[0] if len(layer_specs) == 1 else multi
    plans = [_prepare_output(index, name, layer_spec, out_dir, opts, locks) for layer_spec in layer_specs]
    pending = sorted({pos for _, plan in plans for pos in plan.pending})
    outputs, todo = _layer_chunks(index, plans, pending, opts)
    model = FeatureModel(backbone, model_spec, resolved, engine=opts.engine)
    return _Job(model_spec, model, outputs, todo, len(pending))


def _prepare_output(index, name, spec, out_dir, opts, locks):
    """Lock one layer's file; (its partial _Output, its plan)."""
    path = output_path(out_dir, name, opts.augment, spec.layer)
    locks.enter_context(OutputLock(path.with_name(f".{path.name}.lock")))
    identity = spec.identity()
    old = existing_file(path, identity, opts.overwrite)
    plan = plan_file(index, old, out_dir, path, opts)
    parts_dir = path.with_name(f".{path.stem}.parts")
    remove_leftovers(path, parts_dir)
    prepare_parts_dir(parts_dir, identity)
    return _Output(spec, path, old, plan, parts_dir, chunks=[], n_resumed=0), plan


def _layer_chunks(index, plans, pending, opts):
    """Chunks over the images any file needs; each file's share of a chunk is its own part.

    With one file (or files needing the same images) these are exactly a single file's chunks.
    """
    size = opts.chunk_size or max(opts.batch_size * 8, 256)
    outputs = [output for output, _ in plans]
    todo = []
    for k, start in enumerate(range(0, len(pending), size)):
        members = pending[start:start + size]
        saves = []
        for output, plan in plans:
            wanted = set(plan.pending)
            own = [p for p in members if p in wanted]
            if not own:
                continue
            part = part_name(k, own, index, plan.stats)
            output.chunks.append((part, own))
            if valid_part(output.parts_dir / part, index, own, ("paths",)) is None:
                saves.append((output, part, own))
            else:
                output.n_resumed += len(own)
        if saves:
            todo.append((sorted({p for _, _, own in saves for p in own}), saves))
    return outputs, todo


def _finish(index, job, output, opts, started):
    extracted, new_skipped = collect_parts(index, output.parts_dir, output.chunks)
    if not extracted and not new_skipped and unchanged(index, output.plan, output.old):
        result = untouched(output.path, output.old, started)  # its mtime stays: later stages reuse their work
    else:
        result = assemble(index, output.plan, output.old, extracted, new_skipped, output.path, output.spec,
                           job.model, opts, started, output.n_resumed, job.engines_used)
    shutil.rmtree(output.parts_dir, ignore_errors=True)
    return result


def _verify_written(path, spec, opts):
    """Re-extract a few random rows of the new file on the TF engine; DataError if they differ."""
    if opts.verify <= 0 or not spec.weights_sha256:  # random weights cannot be reproduced
        return
    checked = verify(path, sample=opts.verify, seed=opts.seed, weights=opts.weights,
                     batch_size=opts.batch_size)
    if not checked.ok:
        raise DataError(f"{checked.summary()}: {'; '.join(map(str, checked.mismatches[:3]))} "
                        f"(check with python -m featurepipe.verify {path} --sample 0)")
    if not opts.quiet:
        print(checked.summary(), file=sys.stderr)


def _dask_session(address):
    if address is None:
        return contextlib.nullcontext()
    from .distributed import session

    return session(address)


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(
        prog="python -m featurepipe.extract",
        description="Extract frozen-CNN features of labelled image folders into one HDF5 file per backbone.")
    p.add_argument("--data", help="folder of class folders (optionally under train/val/test) or a CSV manifest path,label[,split]")
    p.add_argument("--backbone", action="append", metavar="NAME",
                   help="backbone name (repeatable) or file:PATH of a Keras model; default: "
                        + " ".join(DEFAULT_BACKBONES))
    p.add_argument("--out", help="output folder (default data/features/<name of DATA>, or "
                                 "featurepipe-out/<name of DATA> when that would be inside DATA)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per forward pass (default {DEFAULT_BATCH_SIZE}: the fastest measured)")
    p.add_argument("--image-size", type=int,
                   help=f"input size in pixels, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default: the backbone's)")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="an inner layer instead of the default (see --list-layers); repeat it to "
                        "read several layers in one forward pass, one file each (<backbone>@<layer>.h5)")
    p.add_argument("--pooling", choices=POOLING_MODES, default="avg", help="global pooling of a spatial map")
    p.add_argument("--weights", help="weights file (default: $FEATUREPIPE_WEIGHTS, Keras cache, download)")
    p.add_argument("--preprocess", choices=sorted(PREPROCESS), help="preprocessing for file: models (a registry backbone accepts only its own)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                   help="stretch: whole image resized, no crop (default); crop: centre crop; pad: letterbox")
    p.add_argument("--augment", choices=("none", "flip"), default="none",
                   help="flip: average the features of the image and its mirror (<backbone>-flip.h5)")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--val-size", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=engine_choices(), default="auto",
                   help="forward pass: auto (every available engine timed once on this machine, the "
                        "fastest remembered) or one engine (tf; litert: LiteRT on a cached conversion)")
    p.add_argument("--workers", type=int,
                   help="image decoding threads, >= 1 (with the litert engine each also runs the network; "
                        "default one per core)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images")
    p.add_argument("--decode", choices=tuple(DECODE_MODES), default=DEFAULT_DECODE,
                   help="scaled: JPEGs decoded at the smallest 1/2, 1/4, 1/8 scale keeping twice the "
                        "input size (default, several times faster on large photos); exact: every pixel")
    p.add_argument("--allow-outside", action="store_true",
                   help="read CSV manifest rows naming files outside the manifest's folder")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run the chunks on Dask: tcp://HOST:8786 (a running scheduler; OUT must be "
                        "on a filesystem all workers share), local (a worker per core) or local:N")
    p.add_argument("--overwrite", action="store_true", help="replace a file made with other settings")
    p.add_argument("--no-verify", action="store_true",
                   help=f"skip re-extracting {EXTRACT_SAMPLE} random rows on the TF engine at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-backbones", action="store_true", help="list the known backbones and exit")
    p.add_argument("--list-layers", metavar="BACKBONE", help="print a backbone's layers and output shapes")
    return p


def print_backbones(file=sys.stdout):
    print(f"{'name':20} {'input':>7} {'features':>8}  weights", file=file)
    for b in BACKBONES.values():
        print(f"{b.name:20} {b.input_size:>7} {b.dim:>8}  {b.weights_source}", file=file)
    print(f"{'file:PATH':20} {'model':>7} {'layer':>8}  any saved Keras model (+ --preprocess)", file=file)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list_backbones:
        print_backbones()
        return 0
    if args.list_layers:
        # a file: model needs some mode to be built; a registry entry has its own
        file_model = args.list_layers.startswith("file:")
        backbone = get_backbone(args.list_layers, preprocess_mode=args.preprocess or ("none" if file_model else None))
        for name, shape in list_layers(backbone, weights=args.weights or "none", image_size=args.image_size):
            print(f"{name:40} {shape}")
        return 0
    if not args.data:
        raise UsageError("--data is required: a folder of class folders or a CSV manifest")
    options = dict(batch_size=args.batch_size, image_size=args.image_size, layer=args.layer,
                   pooling=args.pooling, weights=args.weights, preprocess=args.preprocess,
                   resize=args.resize, augment=args.augment, test_size=args.test_size,
                   val_size=args.val_size, seed=args.seed, overwrite=args.overwrite,
                   engine=args.engine, quiet=args.quiet, max_pixels=args.max_pixels,
                   workers=args.workers, dask=args.dask, decode=args.decode,
                   allow_outside=args.allow_outside,
                   verify=0 if args.no_verify else EXTRACT_SAMPLE)
    extract(args.data, args.backbone or DEFAULT_BACKBONES, out=args.out, **options)
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
