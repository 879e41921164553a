"""Running the forward pass chunk by chunk: every image some file needs is read once (``run_local``)
and pushed into each backbone's chunk; a full chunk is saved as a part of every file that misses
it. The same chunks can run as Dask tasks (``run_chunks_on_dask``, ``featurepipe.distributed``).
"""

import sys
from collections import deque

import numpy as np

from .errors import DataError, ImageError
from .reader import read_images
from .planning import valid_part
from .store import save_part


def progress(total, desc, quiet):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or None, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)


def run_local(index, jobs, opts):
    """Read every image some backbone still needs once, and push it into each such backbone's chunk."""
    active = [job for job in jobs if job.todo]
    n_pending = sum(job.n_pending for job in jobs)
    bar = progress(n_pending, "+".join(job.spec.backbone for job in jobs), opts.quiet)
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


def run_chunks_on_dask(index, job, opts):
    """One backbone's unfinished chunks as Dask tasks writing the same part files (featurepipe.distributed).

    One layer only (``_validate`` refuses several with ``--dask``): a job has one file.
    """
    from .distributed import chunk_jobs, run_chunks

    (output,) = job.outputs
    todo = [(name, own) for _, saves in job.todo for _, name, own in saves]
    bar = progress(job.n_pending, job.spec.backbone, opts.quiet)
    bar.update(job.n_pending - sum(len(m) for _, m in todo))
    if not todo:
        bar.close()
        return
    tasks = chunk_jobs(todo, index=index, model=job.model, parts_dir=output.parts_dir, opts=opts)
    try:
        job.engines_used.update(run_chunks(opts.dask, tasks, bar=bar, extract_chunk=extract_chunk,
                                           quiet=opts.quiet))
    finally:
        bar.close()


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


def extract_chunk(member_paths, stream, featurize, batch_size, bar):
    """A chunk's part (see ``_ChunkBuilder``) from a stream of ``(array, sha1)`` or ImageError."""
    builder = _ChunkBuilder(member_paths, featurize, batch_size, bar)
    for _ in member_paths:
        builder.add(next(stream))
    return builder.part()


def collect_parts(index, parts_dir, chunks):
    """The part files that hold rows, and {index position: reason} of the unreadable images."""
    position = {p: i for i, p in enumerate(index.paths)}
    with_rows, skipped = [], {}
    for name, members in chunks:
        part = valid_part(parts_dir / name, index, members, ("bad_reasons",))
        if part is None:
            raise DataError(f"part file '{parts_dir / name}' vanished or is damaged; run the same command again")
        skipped.update((position[str(p)], str(r)) for p, r in zip(part["bad_paths"], part["bad_reasons"]))
        if len(part["paths"]):
            with_rows.append(parts_dir / name)
    return with_rows, skipped
