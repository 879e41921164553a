"""Fit one classifier on one or more feature files: grid search on train (+ val), score on test.

``fit(feature_files, clf, ...)`` does the work and returns a ``FitResult``;
``python -m featurepipe.fit`` only parses arguments and prints it. Several feature files are
joined column-wise, rows aligned by ``paths``, each block L2-normalised first (a single file is
L2-normalised too, so predict always applies the same transform). The model is saved as
``models/<dataset>/<features>__<clf>.skops`` with what predict needs (``featurepipe.modelfile``:
data that cannot run code when loaded; its sha256 goes into the row and the sidecar), a JSON
sidecar with the metrics, and its row in ``results.csv`` / ``results.md`` of that folder.

At scale: every fit is planned first (``plan_row``, ``featurepipe.budget``) and refused with one
line when it cannot fit in memory; above ``search_max_rows()`` training rows the grid search runs
on a stratified subsample and the winner is refit on all training rows (said in ``best_params``);
a worker process killed by the system (out of memory) fails the row with one line, not a traceback.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from . import __version__
from .classifiers import (CLASSIFIERS, DEFAULT_CLASSIFIERS, calibrated, fit_grid, format_params, get_classifier,
                          needs_calibration, parse_grid)
from .budget import announce, check_plans, plan_fit
from .checks import check_at_least, check_n_jobs, check_seed
from .children import die_with_parent, loky_workers_die_with_parent
from .errors import DataError, UsageError
from .paths import dataset_name, latest_pointer, models_dir_for
from .results import RESULT_COLUMNS, inputs_digest, models_folder_lock, update_results
from .store import load, write_json_atomic
from .modelfile import MODEL_FORMAT, MODEL_SUFFIX, save_bundle  # noqa: F401 (MODEL_FORMAT: predict)

SEARCH_MAX_ROWS = 20_000  # above this many training rows, the grid search runs on a subsample


def search_max_rows():
    """Training rows up to which the grid search uses all of them (``FEATUREPIPE_SEARCH_MAX_ROWS``)."""
    from .classifiers import _env_int

    return _env_int("FEATUREPIPE_SEARCH_MAX_ROWS", SEARCH_MAX_ROWS)


# --------------------------------------------------------------------------- places


def model_stem(features, clf):
    """``<features>__<clf>`` with characters unsafe in file names replaced."""
    return f"{features}__{re.sub(r'[^A-Za-z0-9_.+-]', '-', clf)}"


def resolve_feature_files(feature_files=None):
    """The given files, or those of the most recent extract run."""
    if feature_files:
        return [Path(f) for f in ([feature_files] if isinstance(feature_files, (str, Path)) else feature_files)]
    pointer = latest_pointer()
    try:
        files = json.loads(pointer.read_text())["files"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"no --features given and no extract run recorded ({pointer}); run "
                         "`make features` or pass --features FILE.h5") from None
    if not files:
        raise UsageError(f"{pointer} lists no feature files; pass --features FILE.h5")
    return [Path(f) for f in files]


# --------------------------------------------------------------------------- feature sets


@dataclass(frozen=True)
class FeatureSet:
    """Rows shared by one or more feature files, their blocks L2-normalised and joined.

    Attributes
    ----------
    name : str
        File stems joined by ``+`` (``squeezenet+mobilenet_v2``).
    dataset : str
    X : ndarray of shape (n_samples, sum of block dims), float32, or None (``feature_set_header``)
    y : ndarray of shape (n_samples,), int32
    paths, split : ndarray of shape (n_samples,), str
    class_names : list of str
    blocks : list of dict
        Per file: ``{"name", "dim", "attrs", "file"}``.
    n_dropped : int
        Rows missing from at least one file.
    """

    name: str
    dataset: str
    X: np.ndarray
    y: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    class_names: list
    blocks: list
    n_dropped: int = 0

    @property
    def n_features(self):
        return sum(b["dim"] for b in self.blocks)


def l2_normalize(X):
    """Rows scaled to unit L2 norm (zero rows stay zero); float32 (n, d)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def join_blocks(blocks):
    """L2-normalise each (n, d_i) block and concatenate them -> (n, sum d_i) float32.

    Written block by block into one array: the only full-size allocation is the result.
    """
    blocks = list(blocks)
    out = np.empty((len(blocks[0]), sum(b.shape[1] for b in blocks)), dtype=np.float32)
    col = 0
    for b in blocks:
        for start in range(0, len(b), 65_536):
            out[start:start + 65_536, col:col + b.shape[1]] = l2_normalize(b[start:start + 65_536])
        col += b.shape[1]
    return out


def load_feature_set(feature_files):
    """Load and join feature files by path.

    The metadata of every file is read first (``feature_set_header``); then each file's features
    are read in blocks, L2-normalised and written into the one joined float32 matrix (n, sum of
    dims): no float64 and no second full-size copy, so the peak is the joined matrix plus a block.

    Raises DataError for files with different class names, rows whose split differs between
    files, NaN or infinite features, or no paths in common.
    """
    return read_features(feature_set_header(feature_files))


def feature_set_header(feature_files):
    """The FeatureSet of ``feature_files`` without its matrix (``X`` is None): names, rows,
    labels, splits and block dims, from the files' metadata only. Raises as ``load_feature_set``."""
    files = [Path(f) for f in feature_files]
    if len({f.resolve() for f in files}) != len(files):
        raise UsageError("a feature file is named twice in --features")
    loaded = [load(f, features=False) for f in files]
    first = loaded[0]
    for f in loaded[1:]:
        if f.class_names != first.class_names:
            raise DataError(f"'{f.source}' has other classes than '{first.source}' "
                            f"({f.class_names} vs {first.class_names})")
    common = set(first.paths)
    for f in loaded[1:]:
        common &= set(f.paths)
    union = set().union(*(set(f.paths) for f in loaded))
    if not common:
        raise DataError("the feature files share no image paths (different datasets?): "
                        + ", ".join(str(f) for f in files))
    paths = sorted(common)
    aligned = [f.align(paths) for f in loaded]
    for f in aligned[1:]:
        differ = np.flatnonzero(f.split != aligned[0].split)
        if len(differ):
            raise DataError(f"{len(differ)} images have another split in '{f.source}' than in "
                            f"'{first.source}', e.g. {paths[differ[0]]}; extract them with the same seed")
        if not np.array_equal(f.y, aligned[0].y):
            raise DataError(f"labels differ between '{f.source}' and '{first.source}'")
    blocks = [{"name": Path(f.source).stem, "dim": _feature_dim(f.source), "attrs": dict(f.attrs),
               "file": str(Path(f.source).resolve())} for f in aligned]
    return FeatureSet(name="+".join(b["name"] for b in blocks), dataset=dataset_name(files[0]),
                      X=None, y=aligned[0].y, paths=np.asarray(paths, dtype=object), split=aligned[0].split,
                      class_names=list(first.class_names), blocks=blocks,
                      n_dropped=len(union) - len(common))


def read_features(header, *, train_first=False):
    """``header`` (from ``feature_set_header``) with its joined, block-normalised float32 matrix.

    ``train_first``: rows reordered so that the train and val rows come first (each part in path
    order), which lets fit take the training rows as a view instead of a copy.
    """
    from .store import iter_feature_blocks

    if train_first:
        order = np.argsort(~np.isin(header.split, ("train", "val")), kind="stable")
        header = replace(header, y=header.y[order], paths=header.paths[order], split=header.split[order])
    paths = list(header.paths)
    X = np.empty((len(paths), sum(b["dim"] for b in header.blocks)), dtype=np.float32)
    col = 0
    for b in header.blocks:
        names = load(b["file"], features=False).paths
        where = {p: i for i, p in enumerate(names)}
        rows = np.array([where[p] for p in paths], dtype=np.int64)  # file row of each joined row
        order = np.argsort(rows, kind="stable")
        for idx, block in iter_feature_blocks(b["file"], rows[order], block=16_384):
            dest = order[np.searchsorted(rows[order], idx)]
            _check_finite_block(block, b["file"], names[idx])
            X[dest, col:col + b["dim"]] = l2_normalize(block)
        col += b["dim"]
    return replace(header, X=X)


def _feature_dim(path):
    import h5py

    with h5py.File(path, "r") as f:
        shape = f["features"].shape
    if len(shape) != 2:
        raise DataError(f"'{path}': features shape {shape} is not (rows, dims)")
    return int(shape[1])


def _check_finite_block(block, source, paths):
    """NaN or infinite features (a damaged or foreign file) would fail deep inside scikit-learn."""
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if len(bad):
        raise DataError(f"'{Path(source).name}' has rows with NaN or infinite features, e.g. "
                        f"{paths[bad[0]]}; extract it again (python -m featurepipe.extract "
                        "... --overwrite)")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FitResult:
    """One row of the results table, plus the details printed by the CLI."""

    features: str
    clf: str
    cv_mean: float = math.nan
    cv_std: float = math.nan
    test_accuracy: float = math.nan
    test_macro_f1: float = math.nan
    fit_seconds: float = math.nan
    predict_ms_per_image: float = math.nan
    best_params: str = ""
    status: str = "ok"
    convergence_warnings: int = 0
    n_train: int = 0
    n_test: int = 0
    model: str = ""
    model_sha256: str = ""
    key: str = ""
    test_accuracy_no_leaks: float = math.nan  # filled by featurepipe.audit
    inputs: str = ""  # the feature files by name, size and mtime (featurepipe.results.inputs_digest)
    n_dropped: int = 0
    class_names: list = field(default_factory=list)
    confusion: list = field(default_factory=list)
    report: str = ""
    reused: bool = False

    def row(self):
        """The results-table row (``RESULT_COLUMNS``)."""
        return {c: getattr(self, c) for c in RESULT_COLUMNS}

    def summary(self):
        if self.status != "ok":
            return f"{self.features} / {self.clf}: {self.status}"
        return (f"{self.features} / {self.clf}: CV {self.cv_mean:.4f} ± {self.cv_std:.4f}, test "
                f"accuracy {self.test_accuracy:.4f}, macro-F1 {self.test_macro_f1:.4f} "
                f"({self.fit_seconds:.1f} s) best: {self.best_params or '(defaults)'}")


# --------------------------------------------------------------------------- fitting


def fit(feature_files=None, clf="svm", *, cv=5, grid=None, full_grid=False, n_jobs=-1, seed=0,
        max_seconds=None, dask=None, reuse=False, save=True, feature_set=None, planned=None):
    """Grid-search a classifier on the train (+ val) rows, score it once on the test rows, save it.

    Parameters
    ----------
    feature_files : list of str or Path, optional
        One or more feature files (joined by path); default: those of the latest extract run.
    clf : str or estimator
        A name in ``CLASSIFIERS``, ``package.module:ClassName``, or an estimator instance.
    cv : int, default 5
        Stratified folds (lowered to the smallest class size when needed, at least 2).
    grid : dict of str to list, optional
        Replaces the classifier's default grid (``{"clf__C": [0.1, 1]}``).
    full_grid : bool
        Search the classifier's wider grid (``ClassifierSpec.full_grid``) when no ``grid`` is given.
    n_jobs : int, default -1
        Parallel fits in the grid search (-1: all cores).
    seed : int
    max_seconds : float, optional
        Wall-clock limit for the whole search and refit; past it the row is marked timed out.
        The search then runs in a child process that is killed at the limit.
    dask : str, optional
        ``ADDRESS`` or ``local[:N]``: run the grid search on a Dask cluster.
    reuse : bool
        Return the saved result when one exists for the same inputs, classifier, grid and folds.
    save : bool
        Write the model, its JSON sidecar and the results row.
    feature_set : FeatureSet, optional
        Already loaded ``feature_files`` (compare loads each set once).
    planned : RowPlan, optional
        The row was planned and checked already (compare plans every row first); otherwise the
        plan is made and checked here, before anything is fitted (UsageError when it cannot fit).

    Returns
    -------
    FitResult
    """
    if max_seconds is not None and not max_seconds > 0:
        raise UsageError(f"--max-seconds must be > 0, got {max_seconds}")
    check_seed(seed)
    check_at_least(cv, 2, "--cv")
    check_n_jobs(n_jobs)
    files = resolve_feature_files(feature_files) if feature_set is None else [Path(b["file"]) for b in feature_set.blocks]
    fs = feature_set if feature_set is not None else load_feature_set(files)
    spec = get_classifier(clf)
    train, test = _split_rows(fs)
    folds = _folds(cv, fs.y[train])
    pipeline = spec.make(n_samples=len(train), n_features=fs.X.shape[1], seed=seed)
    grid = spec.grid_for(full_grid, n_samples=len(train), n_features=fs.n_features) if grid is None else dict(grid)
    _check_grid(pipeline, grid, spec.name)
    grid = fit_grid(grid, n_samples=len(train) * (folds - 1) // folds, n_features=fs.X.shape[1])
    plan = plan_row(fs, spec, cv=folds, grid=grid, n_jobs=n_jobs, dask=dask,
                    train_view=len(train) and train[-1] - train[0] + 1 == len(train))
    if planned is None:
        check_plans([plan], dask=dask)
        announce([plan])
    key = row_key(files, spec.name, pipeline, grid, folds, seed, search_rows=plan.search_rows)
    folder = models_dir_for(files[0], claim=save)
    with models_folder_lock(folder) if save else contextlib.nullcontext():
        return _fit_and_save(fs, files, spec, pipeline, grid, folds, seed, train, test, folder, key, plan,
                             reuse=reuse, save=save, n_jobs=n_jobs, max_seconds=max_seconds, dask=dask)


def _fit_and_save(fs, files, spec, pipeline, grid, folds, seed, train, test, folder, key, plan, *, reuse, save,
                  n_jobs, max_seconds, dask):
    """The search, the score and the saved model, row and sidecar (under the folder's lock)."""
    stem = model_stem(fs.name, spec.name)
    if reuse:
        old = _reusable(folder, stem, key)
        if old is not None:
            return old
    base = dict(features=fs.name, clf=spec.name, key=key, n_train=len(train), n_test=len(test),
                n_dropped=fs.n_dropped, class_names=fs.class_names, inputs=inputs_digest(files))
    started = time.perf_counter()
    try:
        found = _run_limited(search, dict(X=rows_of(fs.X, train), y=fs.y[train], pipeline=pipeline, grid=grid,
                                          cv=folds, n_jobs=n_jobs, seed=seed, dask=dask), max_seconds)
    except (_TimedOut, _WorkerDied) as err:
        status = (f"timed out after {max_seconds:g} s" if isinstance(err, _TimedOut) else
                  f"failed: {err}")
        result = FitResult(status=status, fit_seconds=time.perf_counter() - started, **base)
        if save:
            update_results(folder, [result.row()])
        return result
    found["best_params"] = dict(found["best_params"])
    said = plan.note.split("; ") + [_subsample_note(found["search_rows"], len(train))]
    found["note"] = "; ".join(n for n in dict.fromkeys(said) if n)  # the plan's note may say it already
    result = _score(found, fs, test, base, time.perf_counter() - started)
    if save:
        result = _save(result, found["model"], fs, folder, stem)
    return result


def plan_row(fs, spec, *, cv, grid, n_jobs, dask=None, input_bytes=0, train_view=False):
    """The ``budget.RowPlan`` of fitting ``spec`` on feature set ``fs`` (a header is enough:
    nothing is read or fitted). ``input_bytes``: a matrix still to be loaded, counted in the peak."""
    train = np.flatnonzero(np.isin(fs.split, ("train", "val")))
    search_rows = min(len(train), search_max_rows())
    workers = (os.cpu_count() or 1) if n_jobs < 0 else n_jobs
    pipeline = spec.make(n_samples=len(train), n_features=fs.n_features)
    plan = plan_fit(spec, features=fs.name, n_train=len(train), n_features=fs.n_features,
                    n_classes=len(fs.class_names), n_candidates=_n_candidates(grid), folds=cv,
                    search_rows=search_rows, n_jobs=1 if dask else max(1, workers),
                    calibrated=needs_calibration(pipeline), input_bytes=input_bytes, train_view=train_view)
    note = "; ".join(n for n in (plan.note, _subsample_note(search_rows, len(train))) if n)
    return replace(plan, note=note)


def rows_of(X, index):
    """``X[index]``: a view without a copy when ``index`` is a contiguous run of rows (compare puts
    the training rows first, see ``read_features``), else a copy."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return X[int(index[0]):int(index[-1]) + 1]
    return X[index]


def _n_candidates(grid):
    return math.prod(len(v) for v in grid.values()) if grid else 1


def _subsample_note(search_rows, n_train):
    return f"chosen by CV on a {search_rows}-row subsample" if search_rows < n_train else ""


def _split_rows(fs):
    train = np.flatnonzero(np.isin(fs.split, ("train", "val")))
    test = np.flatnonzero(fs.split == "test")
    if len(train) == 0:
        raise DataError(f"no train rows in {fs.name} (every image is in the test split)")
    if len(np.unique(fs.y[train])) < 2:
        raise DataError(f"the train rows of {fs.name} hold one class only "
                        f"({fs.class_names[int(fs.y[train][0])]}); a classifier needs two or more")
    return train, test


def _folds(cv, y):
    if cv < 2:
        raise UsageError(f"--cv must be >= 2, got {cv}")
    smallest = int(np.bincount(y)[np.unique(y)].min())
    n = min(cv, smallest)
    if n < 2:
        raise DataError("a class has a single train image; cross-validation needs two per class")
    if n < cv:
        warnings.warn(f"--cv {cv} lowered to {n} (the smallest class has {smallest} train images)",
                      stacklevel=3)
    return n


def _check_grid(pipeline, grid, name):
    valid = pipeline.get_params()
    for key, values in grid.items():
        if key not in valid:
            steps = ", ".join(p for p in valid if "__" in p and p.split("__")[0] in ("clf", "pca"))
            raise UsageError(f"'{key}' is not a parameter of {name}; some that are: {steps[:300]}")
        if not isinstance(values, (list, tuple)) or not values:
            raise UsageError(f"grid values for '{key}' must be a non-empty list, got {values!r}")


def row_key(files, clf, pipeline, grid, cv, seed, *, search_rows=None):
    """A digest of everything a results row depends on (inputs by size and mtime)."""
    parts = []
    for f in files:
        st = Path(f).stat()
        parts.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": parts, "clf": clf, "pipeline": repr(pipeline), "grid": repr(sorted(grid.items())),
                       "cv": cv, "seed": seed, "version": __version__,
                       **({"search_rows": search_rows} if search_rows else {})}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def search(*, X, y, pipeline, grid, cv, n_jobs, seed, dask=None, max_rows=None):
    """Stratified grid search, then a refit on all rows (calibrated when needed).

    With more than ``max_rows`` rows (default ``search_max_rows()``) the grid search runs on a
    stratified subsample of ``max_rows`` of them; the winner is refit on all rows.

    Returns
    -------
    dict with ``model`` (fitted), ``best_params``, ``cv_mean``, ``cv_std``, ``convergence_warnings``,
    ``search_rows`` (rows the CV scores come from)
    """
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    rows = _search_rows(y, search_max_rows() if max_rows is None else max_rows, seed)
    Xs, ys = (X, y) if rows is None else (X[rows], y[rows])
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    gs = GridSearchCV(pipeline, grid, cv=folds, n_jobs=n_jobs, refit=False, error_score="raise")
    with _joblib_backend(dask, (Xs, ys)), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            gs.fit(Xs, ys)
        except ValueError as err:
            raise UsageError(f"the grid search failed: {err}") from None
        except _worker_death_errors() as err:
            raise _WorkerDied(KILLED_WORKER) from err
    del Xs, ys
    best = gs.best_params_
    final = clone(pipeline).set_params(**best)
    if needs_calibration(final):
        final = calibrated(final, cv=min(3, cv), seed=seed)
    with warnings.catch_warnings(record=True) as caught:  # in this process: counted, not printed
        warnings.simplefilter("always", ConvergenceWarning)
        final.fit(X, y)
    n_warn = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    i = gs.best_index_
    return {"model": final, "best_params": best, "cv_mean": float(gs.cv_results_["mean_test_score"][i]),
            "cv_std": float(gs.cv_results_["std_test_score"][i]), "convergence_warnings": n_warn,
            "search_rows": len(y) if rows is None else len(rows)}


def _search_rows(y, max_rows, seed):
    """Sorted indices of a stratified subsample of ``max_rows`` rows, or None to use them all."""
    if len(y) <= max_rows:
        return None
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    counts = np.bincount(y)
    # every class in proportion (a uniform sample when a class has a single row)
    if counts[counts > 0].min() < 2:
        return np.sort(np.random.default_rng(seed).choice(index, max_rows, replace=False))
    keep, _ = train_test_split(index, train_size=max_rows, stratify=y, random_state=seed)
    return np.sort(keep)


def _joblib_backend(dask, scatter=None):
    if not dask:
        return loky_workers_die_with_parent()
    from .distributed import joblib_backend  # only when --dask is given

    return joblib_backend(dask, scatter=scatter)


class _TimedOut(Exception):
    pass


KILLED_WORKER = ("a worker process was killed (out of memory?); use a smaller --clf (logreg, knn), "
                 "fewer --n-jobs, fewer --features files, or --dask")


class _WorkerDied(Exception):
    """A process of the search died from outside (the kernel's OOM killer, a SIGKILL)."""


def _worker_death_errors():
    """The exceptions joblib raises when a worker process dies (loky, multiprocessing)."""
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    try:
        from concurrent.futures.process import BrokenProcessPool
    except ImportError:  # pragma: no cover
        return (TerminatedWorkerError,)
    return (TerminatedWorkerError, BrokenProcessPool)


def _child(conn, func, kwargs, parent_pid):
    die_with_parent(parent_pid)
    try:
        conn.send(("ok", func(**kwargs)))
    except BaseException as err:  # send any failure back to the parent
        conn.send(("error", err))
    finally:
        conn.close()


def _run_limited(func, kwargs, seconds):
    """``func(**kwargs)``, in a child process killed after ``seconds`` when a limit is given."""
    if not seconds:
        return func(**kwargs)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, func, kwargs, os.getpid()), daemon=False)
    proc.start()
    send.close()
    try:
        if not recv.poll(seconds):
            raise _TimedOut()
        status, value = recv.recv()
    except EOFError:
        raise _WorkerDied(KILLED_WORKER.replace("a worker process", "the fit's child process")) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    if status == "error":
        raise value
    return value


def _score(found, fs, test, base, seconds):
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    model = found["model"]
    best = "; ".join(p for p in (format_params(found["best_params"]), found.get("note", "")) if p)
    params = dict(best_params=best, cv_mean=found["cv_mean"],
                  cv_std=found["cv_std"], convergence_warnings=found["convergence_warnings"],
                  fit_seconds=seconds)
    if len(test) == 0:
        return FitResult(**base, **params, status="ok (no test rows)")
    t0 = time.perf_counter()
    proba = model.predict_proba(rows_of(fs.X, test))
    ms = (time.perf_counter() - t0) * 1000 / len(test)
    pred = model.classes_[np.argmax(proba, axis=1)]
    y = fs.y[test]
    labels = list(range(len(fs.class_names)))
    return FitResult(**base, **params, test_accuracy=float(accuracy_score(y, pred)),
                     test_macro_f1=float(f1_score(y, pred, average="macro", labels=np.unique(y))),
                     predict_ms_per_image=ms,
                     confusion=confusion_matrix(y, pred, labels=labels).tolist(),
                     report=classification_report(y, pred, labels=labels, target_names=fs.class_names,
                                                  digits=4, zero_division=0))


def _save(result, model, fs, folder, stem):
    from dataclasses import asdict, replace

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{MODEL_SUFFIX}"
    result = replace(result, model=str(path))
    bundle = {"format": MODEL_FORMAT, "model": model, "class_names": fs.class_names,
              "features": fs.name, "clf": result.clf, "block_norm": "l2", "blocks": fs.blocks,
              "featurepipe_version": __version__,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "metrics": result.row()}
    result = replace(result, model_sha256=save_bundle(bundle, path))
    write_json_atomic(folder / f"{stem}.json", {k: _json_safe(v) for k, v in asdict(result).items()})
    update_results(folder, [result.row()])
    return result


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _reusable(folder, stem, key):
    """The saved result for ``stem`` when it was made from the same inputs (``key``)."""
    from dataclasses import fields

    try:
        saved = json.loads((folder / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != key or saved.get("status") != "ok" or not _model_intact(folder, stem, saved):
        return None
    names = {f.name for f in fields(FitResult)}
    values = {k: (math.nan if v is None else v) for k, v in saved.items() if k in names}
    values["reused"] = True
    return FitResult(**values)


def _model_intact(folder, stem, saved):
    """True when the sidecar's model file is there with the sha256 the sidecar recorded."""
    from .modelfile import check_written

    try:
        check_written(folder / f"{stem}{MODEL_SUFFIX}", folder=folder, sha256=saved.get("model_sha256"))
    except DataError:
        return False
    return True


# --------------------------------------------------------------------------- CLI


def add_common_arguments(p):
    """Options shared by fit and compare."""
    p.add_argument("--features", nargs="+", metavar="F.h5",
                   help="feature files (default: those of the latest extract run)")
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="replace the default grid, e.g. C=0.1,1,10 (repeatable; pca__n_components=64 for other steps)")
    p.add_argument("--cv", type=int, default=5, help="stratified cross-validation folds (default 5)")
    p.add_argument("--n-jobs", type=int, default=-1, help="parallel fits (default -1: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="time limit per fit; past it the row is marked timed out")
    p.add_argument("--dask", metavar="ADDRESS|local[:N]", help="run grid searches on a Dask cluster")


def build_parser():
    p = OneLineParser(prog="python -m featurepipe.fit",
                                description="Grid-search one classifier on feature files, score it on the test rows, save it.")
    p.add_argument("--clf", default="svm", help=f"one of {', '.join(CLASSIFIERS)}, or package.module:ClassName (default svm)")
    add_common_arguments(p)
    p.add_argument("--full-grid", action="store_true",
                   help="search the classifier's wider grid (the one compare --all uses)")
    p.add_argument("--list", action="store_true", help="list the classifiers and exit")
    return p


def print_classifiers(file=sys.stdout):
    for name, spec in CLASSIFIERS.items():
        default = "default" if name in DEFAULT_CLASSIFIERS else "--all"
        bounded = (f"; bounded variant: grid {format_params(spec.bounded_grid)}, --all "
                   f"{format_params(spec.bounded_full_grid or spec.bounded_grid)}" if spec.bounded_grid else "")
        print(f"{name:8} ({default}) {spec.description}; grid {format_params(spec.grid_for())}; "
              f"--all/--full-grid {format_params(spec.grid_for(full=True))}{bounded}", file=file)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list:
        print_classifiers()
        return 0
    grid = parse_grid(args.grid) if args.grid else None
    result = fit(args.features, args.clf, cv=args.cv, grid=grid, full_grid=args.full_grid,
                 n_jobs=args.n_jobs, seed=args.seed, max_seconds=args.max_seconds, dask=args.dask)
    if result.n_dropped:
        print(f"{result.n_dropped} images missing from some feature file were left out", file=sys.stderr)
    print(result.summary())
    if result.report:
        print(result.report)
    if result.model:
        print(f"saved {result.model} ({Path(result.model).stat().st_size / 2**20:.1f} MB)")
    return 0 if result.status.startswith("ok") else 1



if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
