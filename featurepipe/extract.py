"""Extract features: image folders -> one HDF5 file per frozen backbone.

``extract(data, backbones, ...)`` is the whole job; ``python -m featurepipe.extract`` only parses
arguments. Work is saved in chunks (``OUT/.<name>.parts/``) as it finishes, and the feature file
is assembled under a temporary name and renamed into place, so a run killed at any moment and
started again redoes only the unfinished chunks. A re-run on a grown folder extracts only the new
or edited images.
"""

import contextlib
import fcntl
import hashlib
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from . import __version__
from .backbones import BACKBONES, POOLING_MODES, PREPROCESS, feature_file_stem, get_backbone, list_layers
from .checks import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_at_least, check_seed, check_workers
from .engines import DEFAULT_BATCH_SIZE, FeatureModel, engine_choices, tensorflow_version
from .errors import DataError, ImageError, UsageError
from .images import assign_split, list_images
from .paths import check_outside_input, default_out_dir, latest_pointer
from .reader import (DECODE_MODES, DEFAULT_DECODE, DEFAULT_MAX_PIXELS, RESIZE_MODES, TIMEOUT_REASON,
                     file_sha1, file_stat, read_images)
from .settings import OLD_DEFAULTS, check_settings, make_spec, split_layers, with_layers
from .store import FeatureFileWriter, load, load_part, remove_stale_temps, save_part, write_json_atomic
from .verify import EXTRACT_SAMPLE, verify

# Chosen by CV on flowers5's training rows and time: the cheapest set within one standard error
# of the best CV of every measured set (docs/backbones.md, "The default backbones").
DEFAULT_BACKBONES = ("squeezenet", "efficientnet_lite0", "efficientnet_lite2")


@dataclass(frozen=True)
class ExtractResult:
    """What one backbone's run did."""

    path: Path
    n_rows: int
    n_extracted: int
    n_kept: int
    n_skipped: int
    n_new_skipped: int
    seconds: float
    duplicate_groups: int
    duplicate_leaks: int
    newly_skipped: tuple = ()
    n_resumed: int = 0  # rows of n_extracted computed by an earlier, interrupted run (its parts)
    files_in_pass: int = 1  # feature files made by the same pass over the images (same seconds)

    def summary(self, max_listed=10):
        computed = self.n_extracted - self.n_resumed
        rate = computed / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.n_resumed} from an interrupted run" if self.n_resumed else ""
        shared = f" for the {self.files_in_pass} files of one pass" if self.files_in_pass > 1 else ""
        line = (f"{self.path.name}: {self.n_rows} images ({computed} extracted{resumed}, "
                f"{self.n_kept} kept), {self.n_skipped} skipped, {self.seconds:.1f} s, "
                f"{rate:.1f} img/s{shared} -> {self.path}")
        for rel, reason in self.newly_skipped[:max_listed]:
            line += f"\n  skipped {rel}: {reason}"
        if len(self.newly_skipped) > max_listed:
            line += f"\n  ... and {len(self.newly_skipped) - max_listed} more (the file's 'skipped' dataset lists all)"
        if self.duplicate_groups:
            line += (f"\n  {self.duplicate_groups} groups of byte-identical images, "
                     f"{self.duplicate_leaks} across splits (see the file's sha1 dataset)")
        return line


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
    out_dir, index = _outputs_and_images(data, out, opts.allow_outside)
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


def _outputs_and_images(data, out, allow_outside):
    """(output folder, ImageIndex). Outputs are never written inside the folder holding the
    images (the next run would list them as a class); a folder is checked before it is walked."""
    what = "--out" if out is not None else "the default output folder"
    out_dir = Path(out) if out is not None else None
    if Path(data).is_dir():
        out_dir = out_dir or default_out_dir(data)
        check_outside_input(data, out_dir, what)
    index = list_images(data, exclude=[out_dir] if out_dir else [], allow_outside=allow_outside)
    folder = index.images_folder()
    out_dir = out_dir or default_out_dir(data, images_folder=folder)
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
                             f"{path.name}), not '{root}'; pass --out DIR to keep both")


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


class _Lock:
    """An exclusive, non-blocking lock on an output file (released by the OS if the process dies)."""

    def __init__(self, path):
        self.path = path
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise UsageError(f"another featurepipe run is writing '{self.path.name[1:-5]}' "
                             "(wait for it to finish)") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _layers(opts):
    """The layers asked for: ``(None,)`` for the backbone's default, else the names given."""
    if not opts.layer:
        return (None,)
    return (opts.layer,) if isinstance(opts.layer, str) else tuple(opts.layer)


def output_path(out_dir, backbone_name, augment, layer=None):
    """``OUT/<backbone>.h5`` for the default layer, ``OUT/<backbone>@<layer>.h5`` for another."""
    return Path(out_dir) / f"{feature_file_stem(backbone_name, layer=layer, augment=augment)}.h5"


def _extract_all(index, names, out_dir, opts):
    """Every backbone's file; each image is read and decoded once for all of them."""
    started = time.time()
    with contextlib.ExitStack() as locks:
        jobs = [_prepare(index, name, out_dir, opts, locks) for name in names]
        if opts.dask is not None:
            for job in jobs:
                _run_chunks_on_dask(index, job, opts)
        else:
            _run_local(index, jobs, opts)
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
    locks.enter_context(_Lock(path.with_name(f".{path.name}.lock")))
    identity = spec.identity()
    old = _existing_file(path, identity, opts.overwrite)
    plan = _plan(index, old, out_dir, path, opts)
    parts_dir = path.with_name(f".{path.stem}.parts")
    _remove_leftovers(path, parts_dir)
    _prepare_parts_dir(parts_dir, identity)
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
            part = _part_name(k, own, index, plan.stats)
            output.chunks.append((part, own))
            if _valid_part(output.parts_dir / part, index, own, ("paths",)) is None:
                saves.append((output, part, own))
            else:
                output.n_resumed += len(own)
        if saves:
            todo.append((sorted({p for _, _, own in saves for p in own}), saves))
    return outputs, todo


def _finish(index, job, output, opts, started):
    extracted, new_skipped = _collect(index, output.parts_dir, output.chunks)
    if not extracted and not new_skipped and _unchanged(index, output.plan, output.old):
        result = _untouched(output.path, output.old, started)  # its mtime stays: later stages reuse their work
    else:
        result = _assemble(index, output.plan, output.old, extracted, new_skipped, output.path, output.spec,
                           job.model, opts, started, output.n_resumed, job.engines_used)
    shutil.rmtree(output.parts_dir, ignore_errors=True)
    return result


def _unchanged(index, plan, old):
    """True when the file would be written again with exactly the rows it holds."""
    if old is None or plan.refreshed or str(old.attrs.get("data_root", "")) != str(index.root):
        return False
    if sorted(plan.keep.values()) != list(range(len(old.paths))):
        return False
    if any(old.split[row] != plan.split[pos] for pos, row in plan.keep.items()):
        return False
    return _skipped_rows(index, plan, {}) == sorted(
        (path, reason, int(size), int(mtime)) for (path, reason), (size, mtime) in zip(old.skipped, old.skipped_stat))


def _untouched(path, old, started):
    n_skipped = len(old.skipped)
    return ExtractResult(path=path, n_rows=len(old.paths), n_extracted=0, n_kept=len(old.paths),
                         n_skipped=n_skipped, n_new_skipped=0, seconds=time.time() - started,
                         duplicate_groups=int(old.attrs.get("duplicate_groups", 0)),
                         duplicate_leaks=int(old.attrs.get("duplicate_leaks", 0)))


def _remove_leftovers(path, parts_dir):
    """Temporary files of writers killed before they could rename them (we hold the lock)."""
    removed = remove_stale_temps(path.parent, f".{path.name}")
    if parts_dir.is_dir():
        removed += remove_stale_temps(parts_dir)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary files left by a killed run, e.g. "
                      f"{removed[0]}", stacklevel=4)


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


def _existing_file(path, identity, overwrite):
    """The old file's rows (without features) when it can be extended, else None."""
    if not path.exists() or overwrite:
        return None
    try:
        old = load(path, features=False)
    except DataError as err:
        raise UsageError(f"{err}; pass --overwrite to replace it") from None
    made = {**OLD_DEFAULTS, **old.attrs}
    changed = [f"{k}={made.get(k)!r} (now {v!r})" for k, v in identity.items()
               if str(made.get(k, "")) != str(v)]
    if changed:
        raise UsageError(f"'{path}' was made with other settings: {', '.join(changed)}; pass the "
                         "same options, --overwrite to replace it or --out to write elsewhere")
    return old


@dataclass
class _Plan:
    stats: list          # (size, mtime_ns) or None per index entry
    keep: dict           # index position -> old row
    keep_skipped: dict   # index position -> (reason, size, mtime)
    refreshed: dict      # index position -> (size, mtime) for kept rows whose stat changed
    pending: list        # index positions to extract
    split: list          # split per index entry


def _plan(index, old, out_dir, path, opts):
    stats = []
    for rel in index.paths:
        try:
            stats.append(file_stat(index.absolute(rel)))
        except OSError:
            stats.append(None)
    keep, keep_skipped, refreshed, pending = {}, {}, {}, []
    old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    old_skips = {}
    if old is not None:
        for (p, reason), (size, mtime) in zip(old.skipped, old.skipped_stat):
            old_skips[p] = (reason, int(size), int(mtime))
    for pos, rel in enumerate(index.paths):
        stat = stats[pos]
        if stat is None:  # listed (e.g. in a CSV) but missing: recorded as skipped
            continue
        row = old_rows.get(rel)
        if stat is not None and row is not None:
            if (int(old.file_size[row]), int(old.mtime_ns[row])) == stat:
                keep[pos] = row
                continue
            if _same_content(index.absolute(rel), old.sha1[row]):
                keep[pos], refreshed[pos] = row, stat
                continue
        if (stat is not None and rel in old_skips and old_skips[rel][1:] == stat
                and not old_skips[rel][0].startswith(TIMEOUT_REASON)):  # a timeout may not recur: retried
            keep_skipped[pos] = old_skips[rel]
            continue
        pending.append(pos)
    split = _splits(index, old, keep, out_dir, path, opts)
    return _Plan(stats, keep, keep_skipped, refreshed, pending, split)


def _same_content(abs_path, old_sha1):
    return file_sha1(abs_path) == old_sha1



def _splits(index, old, keep, out_dir, path, opts):
    """Splits: given by the layout, else kept from this file or its siblings, else assigned."""
    if index.given_split is not None:
        return list(index.given_split)
    known = {}
    for sibling in sorted(Path(out_dir).glob("*.h5")):
        if sibling == path:
            continue
        try:
            other = load(sibling, features=False)
        except Exception:
            continue
        if other.attrs.get("seed") == opts.seed and other.attrs.get("split_source") == "assigned":
            known.update(zip(other.paths, other.split))
    if old is not None:
        known.update({index.paths[pos]: old.split[row] for pos, row in keep.items()})
    known = {p: s for p, s in known.items()}
    return assign_split(index.paths, index.labels, test_size=opts.test_size,
                        val_size=opts.val_size, seed=opts.seed, known=known)


def _part_name(k, members, index, stats):
    """Chunk ``k``'s part file, named by a digest of the images it holds."""
    digest = hashlib.sha1("\n".join(f"{index.paths[p]}|{stats[p]}" for p in members).encode()).hexdigest()[:16]
    return f"part-{k:06d}-{digest}.npz"


def _valid_part(part_path, index, members, keys):
    """A part's ``keys`` when it holds exactly the images of ``members`` (by path), else None.

    Parts store paths, not index positions: a part made before the folder changed (an image
    added or removed shifts every position) is used for the same images or not at all.
    """
    part = load_part(part_path, keys=tuple(dict.fromkeys(("paths", "bad_paths") + tuple(keys))))
    if part is None:
        return None
    held = [str(p) for p in part["paths"]] + [str(p) for p in part["bad_paths"]]
    if sorted(held) != sorted(index.paths[p] for p in members):
        return None
    return part


def _progress(total, desc, quiet):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or None, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


def _run_local(index, jobs, opts):
    """Read every image some backbone still needs once, and push it into each such backbone's chunk."""
    active = [job for job in jobs if job.todo]
    n_pending = sum(job.n_pending for job in jobs)
    bar = _progress(n_pending, "+".join(job.spec.backbone for job in jobs), opts.quiet)
    bar.update(n_pending - sum(len(m) for job in active for m, _ in job.todo))
    if not active:  # every chunk is on disk: no engine to build (nor to record in the file)
        bar.close()
        return
    feeds = [_Feed(job, index, opts, bar) for job in active]
    wanted_by = {}  # index position -> the feeds that need it, in feed order
    for feed in feeds:
        for pos in feed.positions:
            wanted_by.setdefault(pos, []).append(feed)
    order = sorted(wanted_by)
    targets = {index.absolute(index.paths[p]): tuple(f.target for f in wanted_by[p]) for p in order}
    parallel = [f.job.model.engine.parallel for f in feeds if f.per_image]
    stream = read_images(list(targets), targets.__getitem__, max_pixels=opts.max_pixels,
                         workers=opts.workers or (max(parallel) if parallel else None))
    try:
        for pos, item in zip(order, stream):
            for slot, feed in enumerate(wanted_by[pos]):
                feed.add(item if isinstance(item, ImageError) else (item.outputs[slot], item.sha1))
    finally:
        stream.close()
        bar.close()
    for job in active:
        job.engines_used.add(job.model.engine_used)


class _Feed:
    """One backbone's unfinished chunks, filled image by image in order; each full chunk is saved
    as a part of every file that misses it (each keeping its own layer and images)."""

    def __init__(self, job, index, opts, bar):
        self.job, self.index, self.opts, self.bar = job, index, opts, bar
        model = job.model
        self.per_image = model.per_image  # then the network runs in the reader's threads
        self.target = job.spec.target(then=model.one if self.per_image else None)
        self.featurize = _stacked_features if self.per_image else model
        self.positions = [p for members, _ in job.todo for p in members]
        self.chunks = deque(job.todo)
        self._start_chunk()

    def _start_chunk(self):
        self.builder = None
        if self.chunks:
            members, self.saves = self.chunks.popleft()
            self.builder = _ChunkBuilder([self.index.paths[p] for p in members], self.featurize,
                                         self.opts.batch_size, self.bar)

    def add(self, item):
        self.builder.add(item)
        if self.builder.complete:
            layer_parts = self.builder.parts(len(self.job.outputs))
            for output, name, own in self.saves:
                wanted = {self.index.paths[p] for p in own}
                part = layer_parts[self.job.outputs.index(output)]
                save_part(output.parts_dir / name, **_part_of(part, wanted))
            self._start_chunk()


def _part_of(part, wanted):
    """The rows and skips of ``part`` whose paths are in ``wanted``."""
    ok = np.array([str(p) in wanted for p in part["paths"]], dtype=bool)
    bad = np.array([str(p) in wanted for p in part["bad_paths"]], dtype=bool)
    return {"paths": part["paths"][ok], "features": part["features"][ok], "sha1": part["sha1"][ok],
            "bad_paths": part["bad_paths"][bad], "bad_reasons": part["bad_reasons"][bad]}


def _dask_session(address):
    if address is None:
        return contextlib.nullcontext()
    from .distributed import session

    return session(address)


def _run_chunks_on_dask(index, job, opts):
    """One backbone's unfinished chunks as Dask tasks writing the same part files (featurepipe.distributed).

    One layer only (``_validate`` refuses several with ``--dask``): a job has one file.
    """
    from .distributed import chunk_jobs, run_chunks

    (output,) = job.outputs
    todo = [(name, own) for _, saves in job.todo for _, name, own in saves]
    bar = _progress(job.n_pending, job.spec.backbone, opts.quiet)
    bar.update(job.n_pending - sum(len(m) for _, m in todo))
    if not todo:
        bar.close()
        return
    tasks = chunk_jobs(todo, index=index, model=job.model, parts_dir=output.parts_dir, opts=opts)
    try:
        job.engines_used.update(run_chunks(opts.dask, tasks, bar=bar, extract_chunk=_extract_chunk,
                                           quiet=opts.quiet))
    finally:
        bar.close()


def _prepare_parts_dir(parts_dir, identity):
    marker = parts_dir / "settings.json"
    import json

    if parts_dir.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json_atomic(marker, identity)


def _stacked_features(rows):
    return rows


class _ChunkBuilder:
    """Features of one chunk, fed one image at a time in order.

    Batches never cross chunk boundaries (a resumed run repeats them exactly). ``featurize`` maps
    a batch's stacked items to features: the FeatureModel for images, ``_stacked_features`` when
    the items already are feature rows. An item is ``(array, sha1)`` or an ImageError; with a
    multi-layer model the array is a list (one row per layer) and ``featurize`` returns a list.
    """

    def __init__(self, member_paths, featurize, batch_size, bar):
        self.paths = list(member_paths)
        self.featurize, self.batch_size, self.bar = featurize, batch_size, bar
        self.n_added = self.n_counted = 0
        self.batch, self.batch_paths, self.batch_sha1 = [], [], []
        self.ok_paths, self.feats, self.sha1s, self.bad_paths, self.reasons = [], [], [], [], []

    @property
    def complete(self):
        return self.n_added == len(self.paths)

    def add(self, item):
        path = self.paths[self.n_added]
        self.n_added += 1
        if isinstance(item, ImageError):
            self.bad_paths.append(path)
            self.reasons.append(str(item))
        else:
            self.batch.append(item[0])
            self.batch_paths.append(path)
            self.batch_sha1.append(item[1])
        if self.n_added % self.batch_size == 0 or self.complete:
            self._flush()

    def _flush(self):
        if self.batch:
            if isinstance(self.batch[0], list):  # per-layer rows of a multi-layer model
                out = self.featurize([np.stack(rows) for rows in zip(*self.batch)])
            else:
                out = self.featurize(np.stack(self.batch))
            self.feats.append(out if isinstance(out, list) else [out])
            self.ok_paths += self.batch_paths
            self.sha1s += self.batch_sha1
        self.bar.update(self.n_added - self.n_counted)
        self.n_counted = self.n_added
        self.batch, self.batch_paths, self.batch_sha1 = [], [], []

    def parts(self, n_layers=1):
        """One part per layer, each with all the chunk's images."""
        by_layer = list(zip(*self.feats)) or [()] * n_layers
        return [{
            "paths": np.array(self.ok_paths, dtype=str),
            "features": np.concatenate(feats) if feats else np.zeros((0, 0), np.float32),
            "sha1": np.array(self.sha1s, dtype="U40"),
            "bad_paths": np.array(self.bad_paths, dtype=str),
            "bad_reasons": np.array(self.reasons, dtype=str),
        } for feats in by_layer]

    def part(self):
        (part,) = self.parts()
        return part


def _extract_chunk(member_paths, stream, featurize, batch_size, bar):
    """A chunk's part (see ``_ChunkBuilder``) from a stream of ``(array, sha1)`` or ImageError."""
    builder = _ChunkBuilder(member_paths, featurize, batch_size, bar)
    for _ in member_paths:
        builder.add(next(stream))
    return builder.part()


def _collect(index, parts_dir, chunks):
    """The part files that hold rows, and {index position: reason} of the unreadable images."""
    position = {p: i for i, p in enumerate(index.paths)}
    with_rows, skipped = [], {}
    for name, members in chunks:
        part = _valid_part(parts_dir / name, index, members, ("bad_reasons",))
        if part is None:
            raise DataError(f"part file '{parts_dir / name}' vanished or is damaged; run the same command again")
        skipped.update((position[str(p)], str(r)) for p, r in zip(part["bad_paths"], part["bad_reasons"]))
        if len(part["paths"]):
            with_rows.append(parts_dir / name)
    return with_rows, skipped


def _assemble(index, plan, old, parts, new_skipped, path, spec, model, opts, started, n_resumed,
              engines_used):
    """Write the final file: kept rows from the old file and the new parts, sorted by path."""
    position = {p: i for i, p in enumerate(index.paths)}
    part_positions = [[position[str(p)] for p in load_part(part, keys=("paths",))["paths"]] for part in parts]
    good_positions = sorted(set(plan.keep) | {p for positions in part_positions for p in positions})
    if not good_positions:
        reasons = sorted(set(new_skipped.values()))[:3]
        raise DataError(f"no readable images under '{index.root}' ({len(new_skipped)} skipped: "
                        f"{'; '.join(reasons)})")
    dim = load_part(parts[0])["features"].shape[1] if parts else int(old.attrs["feature_dim"])
    row_of = {pos: r for r, pos in enumerate(good_positions)}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    writer = FeatureFileWriter(path, n_rows=len(good_positions), dim=dim,
                               class_names=index.class_names,
                               attrs=_attrs(index, spec, model, opts, dim, old, now, engines_used))
    try:
        _write_kept(writer, index, plan, old, row_of)
        for part in parts:
            _write_part(writer, index, plan, load_part(part), row_of, position)
        skipped = _skipped_rows(index, plan, new_skipped)
        writer.write_skipped(skipped)
        dup_groups, dup_leaks = _duplicates(writer)
        writer.set_attrs(n_rows=len(good_positions), n_skipped=len(skipped),
                         duplicate_groups=dup_groups, duplicate_leaks=dup_leaks)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    n_new = sum(len(p) for p in part_positions)
    return ExtractResult(path=path, n_rows=len(good_positions), n_extracted=n_new,
                         n_kept=len(plan.keep), n_skipped=len(skipped),
                         n_new_skipped=len(new_skipped), seconds=time.time() - started,
                         duplicate_groups=dup_groups, duplicate_leaks=dup_leaks, n_resumed=n_resumed,
                         newly_skipped=tuple(sorted((index.paths[p], r) for p, r in new_skipped.items())))


def _row_fields(index, plan, positions):
    return dict(labels=index.labels[positions], paths=[index.paths[p] for p in positions],
                split=[plan.split[p] for p in positions],
                file_size=[plan.stats[p][0] for p in positions],
                mtime_ns=[plan.stats[p][1] for p in positions])


def _write_kept(writer, index, plan, old, row_of):
    if not plan.keep:
        return
    from .store import iter_feature_blocks

    pos_of_old = {row: pos for pos, row in plan.keep.items()}
    for old_rows, feats in iter_feature_blocks(old.source, sorted(pos_of_old)):
        positions = [pos_of_old[int(r)] for r in old_rows]
        writer.write_rows([row_of[p] for p in positions], features=feats,
                          sha1=[old.sha1[r] for r in old_rows], **_row_fields(index, plan, positions))


def _write_part(writer, index, plan, part, row_of, position):
    positions = [position[str(p)] for p in part["paths"]]
    writer.write_rows([row_of[p] for p in positions], features=part["features"],
                      sha1=list(part["sha1"]), **_row_fields(index, plan, positions))


def _skipped_rows(index, plan, new_skipped):
    rows = [(index.paths[pos], reason, size, mtime) for pos, (reason, size, mtime) in plan.keep_skipped.items()]
    rows += [(index.paths[pos], reason, *plan.stats[pos]) for pos, reason in new_skipped.items()]
    rows += [(rel, "file not found or not readable", -1, -1)
             for rel, st in zip(index.paths, plan.stats) if st is None]
    return sorted(rows)


def _duplicates(writer):
    """Count byte-identical images (groups) and those that span splits (leaks); warn about them."""
    f = writer.file
    sha1 = f["sha1"].asstr()[()]
    split = f["split"].asstr()[()]
    paths = f["paths"].asstr()[()]
    groups = {}
    for i, h in enumerate(sha1):
        groups.setdefault(h, []).append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    leaks = [g for g in dups if len({split[i] for i in g}) > 1]
    if dups:
        example = ", ".join(paths[i] for i in (leaks or dups)[0])
        warnings.warn(f"{len(dups)} groups of byte-identical images ({len(leaks)} across splits, "
                      f"which leaks test answers into training), e.g. {example}", stacklevel=2)
    return len(dups), len(leaks)


def _versions():
    """(TensorFlow, Keras) versions from package metadata: a LiteRT run need not import either."""
    from importlib import metadata

    try:
        keras_version = metadata.version("keras")
    except metadata.PackageNotFoundError:
        import keras

        keras_version = keras.__version__
    return tensorflow_version(), keras_version


def _engine_attr(model, old, engines_used):
    """The engine(s) that made the rows: this run's (``auto`` resolved) and the old file's."""
    names = set(engines_used) - {None}  # empty: no new rows
    if old is not None:
        names |= {n for n in str(old.attrs.get("engine", "")).split("+") if n and n != "auto"}
    return "+".join(sorted(names)) or _engine_without_building(model)


def _engine_without_building(model):
    """The engine an interrupted run made its parts with (``auto`` resolved as it resolved it)."""
    from .engines import auto_choice_without_building

    if model.engine_name != "auto":
        return model.engine_name
    return auto_choice_without_building(model.spec) or model.engine.name


def _attrs(index, spec, model, opts, dim, old, now, engines_used):
    tf_version, keras_version = _versions()
    attrs = spec.attrs()
    attrs.update(
        feature_dim=dim,
        engine=_engine_attr(model, old, engines_used),
        featurepipe_version=__version__,
        tensorflow_version=tf_version,
        keras_version=keras_version,
        data_root=str(index.root),
        seed=opts.seed,
        test_size=opts.test_size,
        val_size=opts.val_size,
        split_source="given" if index.given_split is not None else "assigned",
        created=(old.attrs.get("created") if old is not None else None) or now,
        updated=now,
    )
    return attrs


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(
        prog="python -m featurepipe.extract",
        description="Extract frozen-CNN features of labelled image folders into one HDF5 file per backbone.")
    p.add_argument("--data", help="folder of class folders (optionally under train/val/test) or a CSV manifest path,label[,split]")
    p.add_argument("--backbone", action="append", metavar="NAME",
                   help="backbone name (repeatable) or file:PATH of a Keras model; default: "
                        + " ".join(DEFAULT_BACKBONES))
    p.add_argument("--out", help="output folder (default data/features/<name of DATA>)")
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
