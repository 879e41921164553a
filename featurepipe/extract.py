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
import os
import shutil
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .cli import OneLineParser, warn_line
from . import __version__
from .backbones import (BACKBONES, POOLING_MODES, PREPROCESS, backbone_file_stem, get_backbone,
                        import_tensorflow, list_layers, make_spec)
from .checks import (MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_at_least, check_image_size, check_seed,
                     check_workers)
from .engines import DEFAULT_BATCH_SIZE, FeatureModel, engine_choices, tensorflow_version
from .errors import DataError, ImageError, UsageError
from .images import DEFAULT_MAX_PIXELS, RESIZE_MODES, assign_split, content_hash, file_stat, list_images, load_image
from .paths import default_out_dir, is_inside, latest_pointer
from .store import FeatureFileWriter, load, load_part, remove_stale_temps, save_part, write_json_atomic
from .verify import EXTRACT_SAMPLE, verify

DEFAULT_BACKBONES = ("squeezenet", "mobilenet_v2", "efficientnet_lite0")
DECODE_TIMEOUT = 120.0
TIMEOUT_REASON = "decoding took longer than"  # such skips are retried by the next run


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

    def summary(self, max_listed=10):
        computed = self.n_extracted - self.n_resumed
        rate = computed / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.n_resumed} from an interrupted run" if self.n_resumed else ""
        line = (f"{self.path.name}: {self.n_rows} images ({computed} extracted{resumed}, "
                f"{self.n_kept} kept), {self.n_skipped} skipped, {self.seconds:.1f} s, "
                f"{rate:.1f} img/s -> {self.path}")
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
    """Settings shared by every backbone of one run."""

    batch_size: int = DEFAULT_BATCH_SIZE
    image_size: int = None
    layer: str = None
    pooling: str = "avg"
    weights: str = None
    preprocess: str = None
    resize: str = "stretch"
    augment: str = "none"
    test_size: float = 0.2
    val_size: float = 0.0
    seed: int = 0
    overwrite: bool = False
    engine: str = "auto"
    quiet: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = None
    chunk_size: int = None
    verify: int = EXTRACT_SAMPLE  # rows re-extracted on the TF engine and compared at the end; 0: none
    dask: str = None              # tcp://HOST:8786 | local | local:N: chunks run as Dask tasks


def extract(data, backbones=DEFAULT_BACKBONES, *, out=None, **options):
    """Extract features of every image under ``data`` with each backbone.

    Parameters
    ----------
    data : str or Path
        Folder of class folders (optionally below ``train/val/test``) or a CSV manifest.
    backbones : list of str
        Registry names or ``file:PATH``.
    out : str or Path, optional
        Output folder; default ``data/features/<name of data>``.
    **options
        See ``Options``: batch_size, image_size, layer, pooling, weights, preprocess, resize,
        augment, test_size, val_size, seed, overwrite, engine, quiet, max_pixels, workers,
        chunk_size, verify, dask (see ``featurepipe.distributed``).

    Returns
    -------
    list of ExtractResult, one per backbone
    """
    opts = Options(**options)
    backbones = list(backbones) if not isinstance(backbones, str) else [backbones]
    _validate(opts, backbones)
    out_dir = Path(out) if out is not None else default_out_dir(data)
    _check_outside_input(data, out_dir, explicit=out is not None)
    index = list_images(data)
    _check_same_dataset(out_dir, index.root)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _dask_session(opts.dask):
        results = [_extract_backbone(index, name, out_dir, opts) for name in backbones]
    pointer = latest_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(pointer, {"data": str(index.root), "files": [str(r.path.resolve()) for r in results]})
    return results


def _check_outside_input(data, out_dir, *, explicit):
    """Outputs are never written inside an image folder: the next run would list them as a class."""
    data = Path(data)
    if data.is_dir() and is_inside(out_dir, data):
        where = "--out" if explicit else f"the default output folder (FEATUREPIPE_DATA/features = {out_dir.parent})"
        raise UsageError(f"{where} '{out_dir}' is inside the image folder '{data}'; pass --out DIR "
                         "outside it")


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
    check_image_size(opts.image_size)
    check_workers(opts.workers)
    check_seed(opts.seed)
    check_at_least(opts.chunk_size, 1, "chunk_size")
    check_at_least(opts.verify, 0, "verify")
    if not 0 <= opts.test_size < 1 or not 0 <= opts.val_size < 1 or opts.test_size + opts.val_size >= 1:
        raise UsageError(f"--test-size and --val-size must be in [0, 1) with a sum below 1 "
                         f"(got {opts.test_size} and {opts.val_size})")
    if opts.max_pixels < 1:
        raise UsageError(f"--max-pixels must be >= 1, got {opts.max_pixels}")
    if opts.pooling not in POOLING_MODES:
        raise UsageError(f"unknown --pooling '{opts.pooling}'; use avg or max")
    if opts.resize not in RESIZE_MODES:
        raise UsageError(f"unknown --resize '{opts.resize}'; use one of {', '.join(RESIZE_MODES)}")
    if opts.augment not in ("none", "flip"):
        raise UsageError(f"unknown --augment '{opts.augment}'; use flip")
    if opts.preprocess is not None and opts.preprocess not in PREPROCESS:
        raise UsageError(f"unknown --preprocess '{opts.preprocess}'; use one of {', '.join(PREPROCESS)}")
    if len(backbones) > 1 and (opts.weights or opts.layer):
        raise UsageError("--weights and --layer apply to one backbone; run one --backbone at a time")
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


def output_path(out_dir, backbone_name, augment):
    stem = backbone_file_stem(backbone_name) + ("-flip" if augment == "flip" else "")
    return Path(out_dir) / f"{stem}.h5"


def _extract_backbone(index, name, out_dir, opts):
    started = time.time()
    backbone = get_backbone(name, preprocess_mode=opts.preprocess)
    spec, resolved = make_spec(backbone, layer=opts.layer, pooling=opts.pooling,
                               image_size=opts.image_size, resize=opts.resize,
                               augment=opts.augment, weights=opts.weights)
    path = output_path(out_dir, name, opts.augment)
    with _Lock(path.with_name(f".{path.name}.lock")):
        old = _existing_file(path, spec, opts.overwrite)
        plan = _plan(index, old, out_dir, path, opts)
        model = FeatureModel(backbone, spec, resolved, engine=opts.engine)
        parts_dir = path.with_name(f".{path.stem}.parts")
        _remove_leftovers(path, parts_dir)
        extracted, new_skipped, n_resumed, engines_used = _run_chunks(index, plan, model, spec, parts_dir, opts)
        result = _assemble(index, plan, old, extracted, new_skipped, path, spec, model, opts, started,
                           n_resumed, engines_used)
        shutil.rmtree(parts_dir, ignore_errors=True)
    if not opts.quiet:
        print(result.summary(), file=sys.stderr)
    _verify_written(result.path, spec, opts)
    return result


def _remove_leftovers(path, parts_dir):
    """Temporary files of writers killed before they could rename them (we hold the lock)."""
    removed = remove_stale_temps(path.parent, f".{path.name}")
    if parts_dir.is_dir():
        removed += remove_stale_temps(parts_dir)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary files left by a killed run, e.g. "
                      f"{removed[0]}", stacklevel=3)


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


def _existing_file(path, spec, overwrite):
    """The old file's rows (without features) when it can be extended, else None."""
    if not path.exists() or overwrite:
        return None
    try:
        old = load(path, features=False)
    except DataError as err:
        raise UsageError(f"{err}; pass --overwrite to replace it") from None
    changed = [f"{k}={old.attrs.get(k)!r} (now {v!r})" for k, v in spec.identity().items()
               if str(old.attrs.get(k, "")) != str(v)]
    if changed:
        raise UsageError(f"'{path}' was made with other settings: {', '.join(changed)}; pass "
                         "--overwrite to replace it or --out to write elsewhere")
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
    try:
        with open(abs_path, "rb") as fh:
            return content_hash(fh.read()) == old_sha1
    except OSError:
        return False


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


def _chunks(pending, index, stats, chunk_size):
    """Fixed chunks of the pending work, each named by a digest of what it holds."""
    for k, start in enumerate(range(0, len(pending), chunk_size)):
        members = pending[start:start + chunk_size]
        digest = hashlib.sha1("\n".join(f"{index.paths[p]}|{stats[p]}" for p in members).encode()).hexdigest()[:16]
        yield f"part-{k:06d}-{digest}.npz", members


def _safe_load(abs_path, size, resize, max_pixels, then=None, clock=None):
    """(rgb or then(rgb), sha1), or the ImageError saying why the file cannot be decoded.

    Only decoding is guarded: an error in ``then`` (the network) is a real failure and propagates.
    ``clock`` (a dict) receives ``started`` and ``decoded`` monotonic times, so the caller can time
    the decoding alone.
    """
    clock = {} if clock is None else clock
    clock["started"] = time.monotonic()
    try:
        rgb, sha1 = load_image(abs_path, size, resize, max_pixels=max_pixels)
    except ImageError as err:
        return err
    except Exception as err:  # never let one file end the run
        return ImageError(f"cannot decode: {type(err).__name__}: {err}")
    finally:
        clock["decoded"] = time.monotonic()
    return (rgb if then is None else then(rgb)), sha1


def _result_within(future, clock, timeout):
    """The future's result, or an ImageError once its decoding (not the network) passed ``timeout``.

    A task that has not started when the time is up sits behind decoders stuck on earlier files:
    it is reported too, so no file can hang the run.
    """
    while True:
        started = clock.get("started")
        if "decoded" in clock:
            return future.result()  # decoded: what is left is the network, which is never cut short
        left = timeout if started is None else timeout - (time.monotonic() - started)
        try:
            return future.result(timeout=max(left, 0.01))
        except FuturesTimeout:
            if "decoded" not in clock and (clock.get("started") is None
                                           or time.monotonic() - clock["started"] >= timeout):
                return ImageError(f"{TIMEOUT_REASON} {timeout:.0f} s")


def decoded_stream(abs_paths, size, resize, *, workers=None, prefetch=256, max_pixels=DEFAULT_MAX_PIXELS,
                   timeout=DECODE_TIMEOUT, then=None):
    """Yield ``(rgb, sha1)`` or an ImageError per path, in order, decoding ahead in threads.

    Decoding (PIL releases the GIL) overlaps the forward pass running in the caller's thread.
    With ``then``, each worker thread yields ``(then(rgb), sha1)`` instead: extract passes
    ``FeatureModel.one`` for engines that run single images in many threads, so one thread decodes
    an image while another runs the network. An image whose decoding takes longer than ``timeout``
    seconds is reported as unreadable, so no single file can hang the run.
    """
    workers = workers or max(2, min(8, os.cpu_count() or 2))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featurepipe-decode")
    futures = deque()
    paths = iter(abs_paths)

    def submit(path):
        clock = {}
        futures.append((pool.submit(_safe_load, path, size, resize, max_pixels, then, clock), clock))

    try:
        for p in paths:
            submit(p)
            if len(futures) >= prefetch:
                break
        while futures:
            result = _result_within(*futures.popleft(), timeout)
            nxt = next(paths, None)
            if nxt is not None:
                submit(nxt)
            yield result
    finally:
        # Do not wait for a decoder stuck on a pathological file.
        pool.shutdown(wait=False, cancel_futures=True)


def _progress(total, desc, quiet):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or None, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


def _run_chunks(index, plan, model, spec, parts_dir, opts):
    """Extract pending images chunk by chunk into part files; return (part files, skipped,
    rows resumed, names of the engines that computed new rows).

    Parts stay on disk: memory holds one chunk at a time however many images there are.
    """
    chunk_size = opts.chunk_size or max(opts.batch_size * 8, 256)
    chunks = list(_chunks(plan.pending, index, plan.stats, chunk_size))
    _prepare_parts_dir(parts_dir, spec)
    done = {name: load_part(parts_dir / name, keys=("positions",)) for name, _ in chunks}
    todo = [(name, members) for name, members in chunks if done[name] is None]
    n_resumed = sum(len(part["positions"]) for part in done.values() if part is not None)
    bar = _progress(len(plan.pending), spec.backbone, opts.quiet)
    bar.update(len(plan.pending) - sum(len(m) for _, m in todo))
    if not todo:  # every chunk is on disk: no engine to build (nor to record in the file)
        bar.close()
        return (*_collect([parts_dir / name for name, _ in chunks]), n_resumed, ())
    if opts.dask is not None:
        engines_used = _run_chunks_on_dask(index, chunks, todo, model, parts_dir, opts, bar)
        return (*_collect([parts_dir / name for name, _ in chunks]), n_resumed, engines_used)
    work = [p for _, members in todo for p in members]
    # Per-image engines run the network in the decode threads; batch engines in this thread.
    featurize = _stacked_features if model.per_image else model
    stream = decoded_stream([index.absolute(index.paths[p]) for p in work], spec.image_size,
                            spec.resize, workers=opts.workers or (model.engine.parallel if model.per_image else None),
                            max_pixels=opts.max_pixels, then=model.one if model.per_image else None)
    try:
        for name, members in todo:
            save_part(parts_dir / name, **_extract_chunk(members, stream, featurize, opts.batch_size, bar))
    finally:
        stream.close()
        bar.close()
    return (*_collect([parts_dir / name for name, _ in chunks]), n_resumed, (model.engine_used,))


def _dask_session(address):
    if address is None:
        return contextlib.nullcontext()
    from .distributed import session

    return session(address)


def _run_chunks_on_dask(index, chunks, todo, model, parts_dir, opts, bar):
    """The unfinished chunks as Dask tasks writing the same part files (featurepipe.distributed);
    returns the names of the engines the workers used."""
    from .distributed import chunk_jobs, run_chunks

    jobs = chunk_jobs(todo, index=index, model=model, parts_dir=parts_dir, opts=opts)
    try:
        return run_chunks(opts.dask, jobs, bar=bar, extract_chunk=_extract_chunk,
                          decoded_stream=decoded_stream, quiet=opts.quiet)
    finally:
        bar.close()


def _prepare_parts_dir(parts_dir, spec):
    marker = parts_dir / "settings.json"
    import json

    if parts_dir.exists():
        try:
            same = json.loads(marker.read_text()) == spec.identity()
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json_atomic(marker, spec.identity())


def _stacked_features(rows):
    return rows


def _extract_chunk(members, stream, featurize, batch_size, bar):
    """Features of one chunk; batches never cross chunk boundaries, so a resumed run repeats them.

    ``featurize`` maps the stacked stream items of a batch to features: the FeatureModel for
    decoded images, ``_stacked_features`` when the stream already yields feature rows.
    """
    ok_pos, feats, sha1s, bad_pos, reasons = [], [], [], [], []
    for start in range(0, len(members), batch_size):
        batch_pos = members[start:start + batch_size]
        images, good = [], []
        for pos in batch_pos:
            item = next(stream)
            if isinstance(item, ImageError):
                bad_pos.append(pos)
                reasons.append(str(item))
            else:
                images.append(item[0])
                good.append(pos)
                sha1s.append(item[1])
        if images:
            feats.append(featurize(np.stack(images)))
            ok_pos += good
        bar.update(len(batch_pos))
    dim = feats[0].shape[1] if feats else 0
    return {
        "positions": np.array(ok_pos, dtype=np.int64),
        "features": np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
        "sha1": np.array(sha1s, dtype="U40"),
        "bad_positions": np.array(bad_pos, dtype=np.int64),
        "bad_reasons": np.array(reasons, dtype=str),
    }


def _collect(part_files):
    """The part files that hold rows, and {index position: reason} of the unreadable images."""
    with_rows, skipped = [], {}
    for path in part_files:
        part = load_part(path, keys=("positions", "bad_positions", "bad_reasons"))
        if part is None:
            raise DataError(f"part file '{path}' vanished or is damaged; run the same command again")
        skipped.update(zip(part["bad_positions"].tolist(), part["bad_reasons"].tolist()))
        if len(part["positions"]):
            with_rows.append(path)
    return with_rows, skipped


def _assemble(index, plan, old, parts, new_skipped, path, spec, model, opts, started, n_resumed,
              engines_used):
    """Write the final file: kept rows from the old file and the new parts, sorted by path."""
    part_positions = [load_part(p, keys=("positions",))["positions"] for p in parts]
    good_positions = sorted(set(plan.keep) | {int(p) for pos in part_positions for p in pos})
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
            _write_part(writer, index, plan, load_part(part), row_of)
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


def _write_part(writer, index, plan, part, row_of):
    positions = [int(p) for p in part["positions"]]
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
    attrs = dict(spec.__dict__)
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
    p.add_argument("--layer", help="an inner layer instead of the default (see --list-layers)")
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
        backbone = get_backbone(args.list_layers, preprocess_mode=args.preprocess or "none")
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
                   workers=args.workers, dask=args.dask,
                   verify=0 if args.no_verify else EXTRACT_SAMPLE)
    with warnings.catch_warnings():
        warnings.showwarning = warn_line
        extract(args.data, args.backbone or DEFAULT_BACKBONES, out=args.out, **options)
    return 0



if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
