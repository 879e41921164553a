"""The HDF5 feature file: the one place that knows its layout (mirrored in docs/format.md).

Datasets (N rows, D features, C classes, M skipped files)::

    features        float32 (N, D)
    labels          int32   (N,)      index into class_names
    paths           utf-8   (N,)      relative to the data root, '/' separators, sorted
    split           utf-8   (N,)      'train' | 'val' | 'test'
    class_names     utf-8   (C,)
    file_size       int64   (N,)      bytes, when extracted
    mtime_ns        int64   (N,)      modification time (ns), when extracted
    sha1            utf-8   (N,)      content hash of the image file
    skipped         utf-8   (M, 2)    [path, reason] of every unreadable file
    skipped_stat    int64   (M, 2)    [file_size, mtime_ns] of those files

Attributes hold the provenance (backbone, layer, pooling, image_size, resize, preprocess, augment,
weights_source, weights_sha256, engine, versions, data_root, created, ...).

A file is only ever written under a temporary name and renamed into place when complete, so a
reader never sees a half-written file, whatever happens to the writer.
"""

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError

STR = h5py.string_dtype("utf-8")
REQUIRED = ("features", "labels", "paths", "split", "class_names")
ROW_DATASETS = ("labels", "paths", "split", "file_size", "mtime_ns", "sha1")


@dataclass(frozen=True)
class Features:
    """The contents of a feature file.

    Attributes
    ----------
    X : ndarray of shape (n_samples, n_features), float32, or None when read without features
    y : ndarray of shape (n_samples,), int32
    paths, split, sha1 : ndarray of shape (n_samples,), str
    class_names : list of str
    attrs : dict
    file_size, mtime_ns : ndarray of shape (n_samples,), int64
    skipped : list of (path, reason)
    skipped_stat : ndarray of shape (n_skipped, 2), int64
    """

    X: np.ndarray
    y: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    class_names: list
    attrs: dict
    file_size: np.ndarray = None
    mtime_ns: np.ndarray = None
    sha1: np.ndarray = None
    skipped: list = field(default_factory=list)
    skipped_stat: np.ndarray = None
    source: str = ""

    def __len__(self):
        return len(self.paths)

    def subset(self, *splits):
        """The rows whose split is one of ``splits`` (e.g. ``subset("train", "val")``)."""
        mask = np.isin(self.split, splits)
        return self._rows(mask)

    def _rows(self, index):
        def take(a):
            return None if a is None else a[index]

        return Features(X=take(self.X), y=take(self.y), paths=take(self.paths),
                        split=take(self.split), class_names=self.class_names, attrs=self.attrs,
                        file_size=take(self.file_size), mtime_ns=take(self.mtime_ns),
                        sha1=take(self.sha1), skipped=self.skipped,
                        skipped_stat=self.skipped_stat, source=self.source)

    def align(self, paths):
        """The rows for ``paths`` in that order (every path must be present)."""
        where = {p: i for i, p in enumerate(self.paths)}
        missing = [p for p in paths if p not in where]
        if missing:
            raise DataError(f"{len(missing)} paths not in {self.source or 'feature file'}, e.g. {missing[0]}")
        return self._rows(np.array([where[p] for p in paths], dtype=np.int64))


def _strings(ds):
    return np.array(ds.asstr()[()], dtype=object)


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def load(path, *, features=True):
    """Read a feature file written by featurepipe (or anything following the contract).

    Parameters
    ----------
    path : str or Path
    features : bool, default True
        False skips the (large) feature matrix: ``X`` is None.

    Returns
    -------
    Features
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: '{path}'")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"'{path}' is not an HDF5 feature file ({err})") from None
    with f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise DataError(f"'{path}' is not a featurepipe feature file (missing {', '.join(missing)})")
        n = f["paths"].shape[0]
        X = f["features"][()] if features else None
        if X is not None and (X.ndim != 2 or X.shape[0] != n):
            raise DataError(f"'{path}': features shape {X.shape} does not match {n} paths")
        skipped = [tuple(r) for r in f["skipped"].asstr()[()]] if "skipped" in f else []
        return check_contract(Features(
            X=None if X is None else X.astype(np.float32, copy=False),
            y=f["labels"][()].astype(np.int32),
            paths=_strings(f["paths"]),
            split=_strings(f["split"]),
            class_names=list(_strings(f["class_names"])),
            attrs={k: _attr_value(v) for k, v in f.attrs.items()},
            file_size=f["file_size"][()] if "file_size" in f else None,
            mtime_ns=f["mtime_ns"][()] if "mtime_ns" in f else None,
            sha1=_strings(f["sha1"]) if "sha1" in f else None,
            skipped=skipped,
            skipped_stat=f["skipped_stat"][()] if "skipped_stat" in f else np.zeros((0, 2), np.int64),
            source=str(path),
        ), f["features"].shape)


def check_contract(feats, shape):
    """``feats`` when its rows keep the contract (module docstring), else one DataError naming
    what is broken: every stage reading the file then stops with one line.

    Parameters
    ----------
    feats : Features
    shape : tuple
        The shape of the file's ``features`` dataset (checked even when ``X`` was not read).
    """
    n, names = len(feats.paths), list(feats.class_names)
    rows = {"labels": feats.y, "split": feats.split, "file_size": feats.file_size,
            "mtime_ns": feats.mtime_ns, "sha1": feats.sha1}
    problem = None
    cache = not names and bool(np.all(feats.split == CACHE_SPLIT)) and bool(np.all(feats.y == -1))
    if len(shape) != 2 or shape[0] != n:
        problem = f"features shape {tuple(shape)} does not match {n} paths"
    elif shape[1] == 0:
        problem = "the features have 0 columns"
    elif bad := [k for k, v in rows.items() if v is not None and (np.ndim(v) != 1 or len(v) != n)]:
        problem = f"'{bad[0]}' has {len(rows[bad[0]])} rows, 'paths' {n}"
    elif cache:  # a transformer cache (below): no classes, labels -1, split "cache"
        pass
    elif not names or len(set(names)) != len(names):
        problem = f"class_names {names[:10]} are {'empty' if not names else 'not unique'}"
    elif n and (int(feats.y.min()) < 0 or int(feats.y.max()) >= len(names)):
        problem = f"a label is {int(feats.y.max()) if int(feats.y.max()) >= len(names) else int(feats.y.min())}, " \
                  f"outside the {len(names)} class_names"
    elif other := sorted(set(feats.split.tolist()) - {"train", "val", "test"}):
        problem = f"split value '{other[0]}' is not train, val or test"
    if problem:
        raise DataError(f"'{feats.source}' breaks the feature-file contract ({problem}); extract it again "
                        "(featurepipe extract ... --overwrite) or fix the program that wrote it")
    return feats


def read_attrs(path):
    """Only the attributes of a feature file."""
    with h5py.File(path, "r") as f:
        return {k: _attr_value(v) for k, v in f.attrs.items()}


def iter_feature_blocks(path, rows, block=4096):
    """Yield (row indices, features) for sorted ``rows`` of a file, ``block`` rows at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    with h5py.File(path, "r") as f:
        ds = f["features"]
        for start in range(0, len(rows), block):
            idx = rows[start:start + block]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            yield idx, ds[lo:hi][idx - lo]


_TMP_PID = re.compile(r"\.tmp-(\d+)")
ROW_BYTES = 256  # a generous bound on a row's bytes besides its features (path, hashes, stats)


class DiskFullError(DataError):
    """No space left on the device holding an output folder."""


def _is_disk_full(err):
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err)


def _disk_full(folder):
    return DiskFullError(f"no space left on the device of '{folder}': free some space or pass --out "
                         "a folder on another disk, then run the same command again (finished work is kept)")


@contextmanager
def disk_full_is_an_error(folder, *, cleanup=None):
    """Turn an out-of-space OSError into one ``DiskFullError`` naming ``folder``; call ``cleanup`` first."""
    try:
        yield
    except OSError as err:
        if not _is_disk_full(err):
            raise
        if cleanup is not None:
            cleanup()
        raise _disk_full(folder) from None


def check_free_space(folder, needed):
    """DiskFullError when the device of ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(f"the feature file needs about {needed / 1e6:.0f} MB but only "
                            f"{free / 1e6:.0f} MB are free on the device of '{folder}': free some "
                            "space or pass --out a folder on another disk (finished work is kept)")


def remove_stale_temps(folder, prefix=""):
    """Delete the ``<prefix>*.tmp-<pid>*`` files in ``folder`` left by processes that are gone
    (a writer killed with ``kill -9``); return their names."""
    removed = []
    for path in sorted(Path(folder).glob(f"{prefix}*.tmp-*")):
        found = _TMP_PID.search(path.name)
        if found is None or _alive(int(found.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


class FeatureFileWriter:
    """Write a complete feature file under a temporary name, then rename it into place.

    Rows are written by position, so the caller can fill them from several sources (rows kept
    from an older file, newly extracted parts) in any order while memory stays flat. The free
    space is checked first; running out of space anyway removes the temporary file and raises
    ``DiskFullError`` (the old file, if any, is untouched).
    """

    def __init__(self, path, *, n_rows, dim, class_names, attrs, resizable=False):
        self.path = Path(path)
        self.resizable = resizable  # every row dataset can grow (the transformer cache appends)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.n_rows = n_rows
        check_free_space(self.path.parent, n_rows * (4 * dim + ROW_BYTES) + (1 << 20))
        self.file = None
        with self._space():
            self._create(n_rows, dim, class_names, attrs)

    def _space(self):
        return disk_full_is_an_error(self.path.parent, cleanup=self.abort)

    def _create(self, n_rows, dim, class_names, attrs):
        self.file = h5py.File(self.tmp_path, "w")
        f = self.file
        chunk_rows = max(1, min(n_rows or 1, (1 << 20) // max(4 * dim, 1)))
        if self.resizable:  # appended a batch at a time: chunks of a batch's size, not the file's
            chunk_rows = max(1, min(256, (1 << 20) // max(4 * dim, 1)))
        f.create_dataset("features", shape=(n_rows, dim), maxshape=(None, dim), dtype="f4",
                         chunks=(chunk_rows, dim) if n_rows or self.resizable else None)
        rows = dict(maxshape=(None,), chunks=(1024,)) if self.resizable else {}
        f.create_dataset("labels", shape=(n_rows,), dtype="i4", **rows)
        for name in ("paths", "split", "sha1"):
            f.create_dataset(name, shape=(n_rows,), dtype=STR, **rows)
        for name in ("file_size", "mtime_ns"):
            f.create_dataset(name, shape=(n_rows,), dtype="i8", **rows)
        f.create_dataset("class_names", data=np.array(class_names, dtype=object), dtype=STR)
        for key, value in attrs.items():
            f.attrs[key] = value if value is not None else ""

    def write_rows(self, positions, **columns):
        """Write rows at ``positions`` (sorted, increasing): features, labels, paths, split,
        file_size, mtime_ns, sha1."""
        if len(positions) == 0:
            return
        with self._space():
            self._write_rows(positions, **columns)

    def _write_rows(self, positions, *, features, labels, paths, split, file_size, mtime_ns, sha1):
        positions = np.asarray(positions, dtype=np.int64)
        f = self.file
        contiguous = positions[-1] - positions[0] + 1 == len(positions)
        where = slice(int(positions[0]), int(positions[-1]) + 1) if contiguous else positions
        f["features"][where] = np.asarray(features, dtype=np.float32)
        f["labels"][where] = np.asarray(labels, dtype=np.int32)
        f["paths"][where] = np.asarray(paths, dtype=object)
        f["split"][where] = np.asarray(split, dtype=object)
        f["sha1"][where] = np.asarray(sha1, dtype=object)
        f["file_size"][where] = np.asarray(file_size, dtype=np.int64)
        f["mtime_ns"][where] = np.asarray(mtime_ns, dtype=np.int64)

    def write_skipped(self, skipped):
        """``skipped``: list of (path, reason, file_size, mtime_ns)."""
        with self._space():
            self._write_skipped(skipped)

    def _write_skipped(self, skipped):
        names = np.array([[p, r] for p, r, _, _ in skipped], dtype=object).reshape(-1, 2)
        stats = np.array([[s, m] for _, _, s, m in skipped], dtype=np.int64).reshape(-1, 2)
        self.file.create_dataset("skipped", data=names, dtype=STR)
        self.file["skipped"].attrs["columns"] = ["path", "reason"]
        self.file.create_dataset("skipped_stat", data=stats, dtype="i8")

    def set_attrs(self, **attrs):
        with self._space():
            for key, value in attrs.items():
                self.file.attrs[key] = value

    def commit(self):
        """Close and atomically replace the destination."""
        with self._space():
            self._commit()

    def _commit(self):
        self.file.flush()
        self.file.close()
        fd = os.open(self.tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp_path, self.path)

    def abort(self):
        """Close and remove the temporary file (the destination is untouched)."""
        try:
            if self.file is not None and self.file.id.valid:
                self.file.close()
        except Exception:  # closing a file whose writes failed may fail again; it is removed anyway
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- parts (resume)


def save_part(path, **arrays):
    """Atomically write one finished chunk of work (an .npz) so a killed run can resume."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_is_an_error(path.parent), open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_part(path, keys=None):
    """Read a chunk written by ``save_part`` (only ``keys`` if given); None when missing or
    unreadable (then it is redone)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in (keys or data.files)}
    except Exception:
        return None


def write_json_atomic(path, obj):
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_bytes_atomic(path, data):
    """Write ``data`` under a temporary name and rename it to ``path``: a reader sees the old file
    or the new one, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write; renamed to ``path`` when the block ends without
    an error (removed otherwise). A full disk is one ``DiskFullError``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_is_an_error(path.parent):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- transformer cache
#
# ``CNNFeatures(cache=PATH)`` keeps a feature file of this same layout: ``paths`` hold absolute
# paths, ``file_size``/``mtime_ns`` their stat when read, ``labels`` -1, ``split`` "cache", no
# classes, and the attrs the extraction settings. A row is reused only for the same path, size,
# mtime and settings. New rows are appended in place (every row dataset is resizable), so a batch
# costs its own rows, not the whole file again; the attribute ``cache_rows``, written after the
# rows, says how many rows are complete (a writer killed mid-append leaves rows past it, which
# are ignored and overwritten). A file made with other settings, or one that cannot be read, is
# replaced by a new one, written atomically.

CACHE_SPLIT = "cache"
CACHE_ROWS = "cache_rows"


def read_cached_features(cache_path, settings):
    """{(abs path, size, mtime_ns): features (D,)} of a transformer cache written with ``settings``
    (empty when the file is missing, unreadable or made with other settings; a later row of the
    same key wins)."""
    try:
        with h5py.File(cache_path, "r") as f:
            if not _same_settings(f, settings):
                return {}
            n = _committed_rows(f)
            keys = zip(f["paths"].asstr()[:n], f["file_size"][:n], f["mtime_ns"][:n])
            return dict(zip(((str(p), int(s), int(m)) for p, s, m in keys), f["features"][:n]))
    except (OSError, KeyError, ValueError):
        return {}


def append_cached_features(cache_path, settings, rows):
    """Add ``rows`` ({(abs path, size, mtime_ns): features (D,)}) to a transformer cache.

    Appends in place when the file holds these settings and feature size; otherwise (no file, other
    settings, unreadable) writes a new file with just these rows under a temporary name.
    """
    if not rows:
        return
    cache_path = Path(cache_path)
    keys = sorted(rows)
    features = np.stack([rows[k] for k in keys]).astype(np.float32)
    try:
        with disk_full_is_an_error(cache_path.parent), h5py.File(cache_path, "r+") as f:
            if _same_settings(f, settings) and f["features"].shape[1] == features.shape[1] \
                    and f["features"].maxshape[0] is None and f["paths"].maxshape[0] is None:
                _append(f, keys, features)
                return
    except (OSError, KeyError, ValueError):  # no file yet, or one that cannot be appended to
        pass
    _new_cache(cache_path, settings, keys, features)


def _same_settings(f, settings):
    return {k: str(v) for k, v in settings.items()} == {k: str(_attr_value(f.attrs.get(k))) for k in settings}


def _committed_rows(f):
    return int(f.attrs.get(CACHE_ROWS, f["paths"].shape[0]))


def _cache_columns(keys):
    n = len(keys)
    return dict(labels=np.full(n, -1, np.int32), paths=np.array([k[0] for k in keys], dtype=object),
                split=np.array([CACHE_SPLIT] * n, dtype=object),
                file_size=np.array([k[1] for k in keys], np.int64),
                mtime_ns=np.array([k[2] for k in keys], np.int64), sha1=np.array([""] * n, dtype=object))


def _append(f, keys, features):
    start = _committed_rows(f)
    end = start + len(keys)
    f["features"].resize((end, features.shape[1]))
    f["features"][start:end] = features
    for name, values in _cache_columns(keys).items():
        f[name].resize((end,))
        f[name][start:end] = values
    f.flush()
    f.attrs[CACHE_ROWS] = end  # the commit: rows past it are an interrupted append
    f.flush()


def _new_cache(cache_path, settings, keys, features):
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    writer = FeatureFileWriter(cache_path, n_rows=len(keys), dim=features.shape[1], class_names=[],
                               attrs={**{k: str(v) for k, v in settings.items()}, CACHE_ROWS: len(keys)},
                               resizable=True)
    try:
        writer.write_rows(np.arange(len(keys)), features=features, **_cache_columns(keys))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
