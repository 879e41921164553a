"""Scale out on Dask (``pip install -e .[dask]``): sharded extraction and a joblib backend.

An address is ``tcp://HOST:8786`` (a running ``dask scheduler``), ``local`` (a LocalCluster with
one worker process per core) or ``local:N`` (N worker processes), each worker with one thread.

Extraction: every unfinished chunk of ``extract`` becomes one Dask task. The worker builds the
FeatureModel once per process, decodes and extracts the chunk with the same code and batches as a
local run and writes the chunk's part file into ``OUT/.<stem>.parts/``, so the output folder must
be on a filesystem that the client and every worker see under the same path. The client then
merges the parts as a local run does. A chunk whose worker dies is retried by Dask; finished
chunks are kept, so a re-run redoes only unfinished ones.

Fitting: ``with joblib_backend(address, scatter=(X, y)): ...`` runs joblib's parallel loops
(GridSearchCV's fits) on the cluster through joblib's "dask" backend, the data scattered once.

Nothing here imports TensorFlow; Dask itself is imported inside functions only.
"""

import os
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

_ACTIVE = {}                 # address -> Client opened by session() in this process
_HELD = {}                   # id(Client) -> the last grid search's scattered futures (joblib_backend)
_MODELS = {}                 # per worker process: (backbone, spec, engine) -> FeatureModel
_MODELS_LOCK = threading.Lock()


def _import_dask():
    try:
        import distributed
    except ImportError:
        raise UsageError("--dask needs Dask: pip install -e '.[dask]' (dask[distributed])") from None
    return distributed


def parse_address(address):
    """``(kind, value)``: ``("local", n_workers)`` or ``("remote", "tcp://HOST:PORT")``.

    Raises UsageError for anything else.
    """
    text = str(address).strip()
    if text == "local":
        return "local", os.cpu_count() or 1
    if text.startswith("local:"):
        n = text[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"--dask {text}: the number of local workers must be >= 1 (e.g. local:2)")
        return "local", int(n)
    if "://" in text and text.split("://", 1)[1]:
        return "remote", text
    if ":" in text and text.rsplit(":", 1)[1].isdigit():
        return "remote", f"tcp://{text}"
    raise UsageError(f"--dask '{text}': use tcp://HOST:8786 (a running dask scheduler), local or local:N")


@contextmanager
def session(address):
    """A Dask client for ``address`` (starting a LocalCluster for ``local[:N]``), closed at the end.

    While open, ``client(address)`` returns it, so several backbones share one cluster.

    Yields
    ------
    distributed.Client
    """
    if address in _ACTIVE:
        yield _ACTIVE[address]
        return
    kind, value = parse_address(address)
    distributed = _import_dask()
    cluster = None
    try:
        if kind == "local":
            cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=40)
            dask_client = distributed.Client(cluster)
        else:
            try:
                dask_client = distributed.Client(value, timeout="20s")
            except (OSError, ValueError) as err:  # ValueError: an address scheme Dask does not know
                raise UsageError(f"cannot reach the Dask scheduler at {value} ({err}); start one "
                                 "with `dask scheduler` and pass --dask tcp://HOST:8786, or use "
                                 "--dask local") from None
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    _ACTIVE[address] = dask_client
    try:
        yield dask_client
    finally:
        del _ACTIVE[address]
        _HELD.pop(id(dask_client), None)
        dask_client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def joblib_backend(address, scatter=None):
    """Run joblib's parallel loops (e.g. GridSearchCV with ``n_jobs``) on the Dask cluster.

    Results equal a local run with the same seeds: only where each fit runs changes. ``scatter``
    (e.g. ``(X, y)``) is sent to the workers once, and every task refers to it instead of carrying
    its own copy (Dask-ML's pattern for grid searches).

    Yields
    ------
    distributed.Client
    """
    import joblib

    with session(address) as dask_client:
        extra = {"scatter": list(scatter)} if scatter is not None else {}
        with joblib.parallel_config(backend="dask", **extra):
            # The scattered rows' keys are content hashes, so the next search on the same rows (the
            # next row of compare) scatters the same keys: the previous search's futures are let go
            # only now, after that scatter, or the scheduler could forget the keys the new tasks need.
            backend = joblib.parallel.get_active_backend()[0]
            _HELD[id(dask_client)] = list(getattr(backend, "data_futures", {}).values())
            yield dask_client


@dataclass(frozen=True)
class ChunkJob:
    """What one worker needs to extract one chunk and write its part file.

    ``abs_paths`` are read by the worker and ``part_path`` is written by it: both must be visible
    under the same names on every machine (a shared filesystem).
    """

    part_path: str
    paths: tuple             # the chunk's images as stored (relative to the data root), in order
    abs_paths: tuple         # the same images, to read
    backbone: str            # registry name or file:PATH
    spec: object             # ExtractionSettings (decode mode included)
    resolved: object         # ResolvedWeights or None
    engine: str
    batch_size: int
    decode_workers: int
    max_pixels: int


class _NoBar:
    def update(self, n=1):
        pass


def worker_model(backbone, spec, resolved, engine):
    """The FeatureModel for these settings, built once per worker process."""
    from .backbones import get_backbone
    from .engines import FeatureModel

    key = (backbone, spec, resolved, engine)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = FeatureModel(get_backbone(backbone, preprocess_mode=spec.preprocess),
                                        spec, resolved, engine=engine)
        return _MODELS[key]


def _pairs(reads):
    """``(array, sha1)`` or ImageError per image from the reader's single-target results."""
    from .errors import ImageError

    for read in reads:
        yield read if isinstance(read, ImageError) else (read.outputs[0], read.sha1)


def _stacked(rows):
    return rows


def run_chunk_job(job, extract_chunk):
    """Extract one chunk on a worker and save its part; return the name of the engine used.

    ``extract_chunk`` is extract's own batching (passed in, so this module stays below extract);
    images come from the same reader, so decoding, batches and engine equal a local run's.
    """
    from .reader import read_images
    from .store import save_part

    model = worker_model(job.backbone, job.spec, job.resolved, job.engine)
    # As locally: a per-image engine runs the network in the reader's threads.
    then = model.one if model.per_image else None
    target = job.spec.target(then=then)
    reads = read_images(list(job.abs_paths), [target], max_pixels=job.max_pixels,
                        workers=job.decode_workers or (model.engine.parallel if then else None))
    stream = _pairs(reads)
    try:
        part = extract_chunk(list(job.paths), stream, _stacked if then else model, job.batch_size, _NoBar())
    finally:
        stream.close()
        reads.close()
    save_part(job.part_path, **part)
    return model.engine_used


def run_chunks(address, jobs, *, bar, extract_chunk, quiet=False):
    """Run ``jobs`` (ChunkJob) on the cluster; each writes its part file into the shared folder.

    The bar advances by a chunk's images as it finishes, once this machine can read its part.
    Every job runs to its end even when one fails (its part is kept for the re-run); then the
    first error is raised. Returns the sorted names of the engines the workers used (``auto``
    resolved on each worker; none for chunks of unreadable images only).
    """
    from .store import load_part

    distributed = _import_dask()
    with session(address) as dask_client:
        if not quiet and jobs:
            _announce(dask_client)
        run = f"featurepipe-{uuid.uuid4().hex[:8]}"
        futures = {dask_client.submit(run_chunk_job, job, extract_chunk,
                                      key=f"{run}-{Path(job.part_path).stem}", retries=1): job
                   for job in jobs}
        errors, engines = [], set()
        try:
            for future in distributed.as_completed(futures):
                job = futures[future]
                if future.status != "finished":
                    errors.append(future.exception())
                    continue
                engines.add(future.result())
                _check_part(load_part, job.part_path)
                bar.update(len(job.paths))
        except BaseException:
            dask_client.cancel(list(futures))
            raise
    if errors:
        raise errors[0]
    return tuple(sorted(engines - {None}))


def _check_part(load_part, part_path):
    if load_part(part_path, keys=("paths",)) is None:
        raise UsageError(f"a Dask worker wrote '{part_path}' but this machine cannot read it: the "
                         "output folder (--out) must be on a filesystem shared by all workers")


def _announce(dask_client):
    n = len(dask_client.scheduler_info().get("workers", {}))
    link = dask_client.dashboard_link if _has_dashboard() else "none (pip install bokeh)"
    print(f"dask: {n} workers at {dask_client.scheduler.address}, dashboard {link}", file=sys.stderr)


def _has_dashboard():
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_jobs(todo, *, index, model, parts_dir, opts):
    """One ChunkJob per unfinished chunk ``(name, positions)`` of the client's FeatureModel."""
    return [ChunkJob(part_path=str(Path(parts_dir).resolve() / name),
                     paths=tuple(index.paths[p] for p in members),
                     abs_paths=tuple(str(Path(index.absolute(index.paths[p])).resolve()) for p in members),
                     backbone=model.backbone.name, spec=model.spec, resolved=model.resolved,
                     engine=model.engine_name,
                     batch_size=opts.batch_size, decode_workers=opts.workers,
                     max_pixels=opts.max_pixels)
            for name, members in todo]

