"""Audit a data set from its features: near-duplicates and leaks, label suspects, learning curve.

``audit(features=...)`` does the work and returns an ``AuditResult``; ``python -m featurepipe.audit``
only parses arguments and prints its summary. It writes under ``models/<dataset>/audit/``:

* ``duplicates.csv`` (``path_a, path_b, split_a, split_b, cosine``): pairs of images whose features
  are nearly identical, from a nearest-neighbour search on the features of all the given files
  (each L2-normalised, joined, PCA-whitened to at most 512 dimensions and one per 2 images — only
  centred when there are too few images to whiten, which the summary says —, L2-normalised
  again). Every pair is checked (faiss's flat index) up to ``EXACT_MAX_ROWS`` images, faiss's IVF
  index past that.
* the ``test_accuracy_no_leaks`` column of ``results.csv`` / ``results.md``: each row's saved model
  scored again on the test images that have no near-duplicate in train/val.
* ``suspects.csv`` (``path, split, given, suggested, score``, most suspicious first): the images
  whose out-of-fold probabilities of logistic regression (cross-validated on train/val; the model
  fitted on all of train/val for test) favour another class, or that cleanlab's
  ``find_label_issues`` flags, ranked by cleanlab's self-confidence.
* ``learning_curve.csv`` / ``.png``: logistic regression's test accuracy with 1, 2, 5, 10, 20, 50,
  ... train images per class up to all, several seeds.
* ``summary.json``: the counts, the threshold, the curve's doubling gain, how duplicates were
  searched and ``notes``: what was sampled or approximated.

Past ``LARGE_ROWS`` images the suspects and the curve take bounded paths (``audit``'s
``large_rows``). Worker processes die with the audit (``featurepipe.children``).
"""

import csv
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .classifiers import CLASSIFIERS
from .cli import OneLineParser
from .csvcells import dict_writer, unescape_row
from .errors import DataError, UsageError
from .fit import l2_normalize, load_feature_set, resolve_feature_files
from .paths import models_dir_for
from .plotting import plain
from .results import can_be_chosen, current_rows, ranked, read_results, update_results
from .store import write_json_atomic

# Cosine of the whitened features (three default backbones): 28 of 30 planted copies of flowers5
# photos (resized, slightly cropped, re-compressed, mirrored) score >= 0.70; the pairs of other
# images above it are, by eye, nearly all two shots or two edits of one scene
# (benchmarks/audit_planted.py; docs/audit.md).
DEFAULT_THRESHOLD = 0.70
WHITEN_DIMS = 512
WHITEN_FIT_ROWS = 20_000
ROWS_PER_WHITENED_DIM = 2     # whiten to at most rows / 2 axes: fewer rows make every cosine -1/(n-1)
MIN_WHITENED_DIMS = 16        # below this many axes (< 32 images), search the centred features instead
EXACT_MAX_ROWS = 200_000      # past this many images, faiss's IVF index finds the pairs (docs/audit.md)
IVF_PROBES = 16               # IVF cells searched per image
BLOCK_BYTES = 256 << 20       # memory for one block of the exact similarity matrix
LARGE_ROWS = 20_000           # past this many images: suspects and curve on PCA axes, curve capped
LARGE_PCA_DIMS = 256
CURVE_MAX_TRAIN_ROWS = 20_000  # at scale: learning-curve points of at most this many train rows ...
CURVE_MAX_TEST_ROWS = 10_000   # ... scored on a sample of this many test rows
LARGE_FOLDS = 3
CURVE_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
CURVE_SEEDS = 5
SUSPECT_FOLDS = 5
DUPLICATE_COLUMNS = ("path_a", "path_b", "split_a", "split_b", "cosine")
SUSPECT_COLUMNS = ("path", "split", "given", "suggested", "score")
CURVE_COLUMNS = ("features", "clf", "n_per_class", "accuracy_mean", "accuracy_std", "n_seeds")


@dataclass(frozen=True)
class DuplicatePair:
    path_a: str
    path_b: str
    split_a: str
    split_b: str
    cosine: float


@dataclass(frozen=True)
class Suspect:
    """An image whose given label its features disagree with; ``score`` = 1 - p(given label)."""

    path: str
    split: str
    given: str
    suggested: str
    score: float


@dataclass(frozen=True)
class CurvePoint:
    n_per_class: int
    accuracy_mean: float
    accuracy_std: float
    n_seeds: int


@dataclass(frozen=True)
class AuditResult:
    """What ``audit`` found and wrote.

    Attributes
    ----------
    folder : Path
        ``models/<dataset>/audit``.
    features : str
        The joined feature set searched for duplicates and suspects (``a+b+c``).
    threshold : float
    duplicates : list of DuplicatePair, highest cosine first
    n_groups : int
        Groups of near-duplicate images (connected pairs).
    leaked_test : list of str
        Test images with a near-duplicate in train or val.
    suspects : list of Suspect, most suspicious first
    n_flagged : int
        Suspects cleanlab's ``find_label_issues`` flags as wrong labels.
    curve_features : str
    curve : list of CurvePoint
    doubling_gain : float
        Accuracy expected from doubling the images per class (slope of the curve's last points
        against log2 of the images per class).
    rows_rescored : int
        Results rows given a ``test_accuracy_no_leaks``.
    search : str
        How the near-duplicates were searched (``exact ... search on the whitened to K axes features``).
    notes : list of str
        What was sampled or approximated (above ``large_rows``), and a warning when the
        duplicate search could not whiten (too few images).
    feature_set : FeatureSet
        The joined features (not in the repr).
    """

    folder: Path
    features: str
    threshold: float
    duplicates: list
    n_groups: int
    leaked_test: list
    suspects: list
    n_flagged: int
    curve_features: str
    curve: list
    doubling_gain: float
    rows_rescored: int = 0
    feature_set: object = field(default=None, repr=False)
    reused: bool = False  # read back from an earlier audit of the same inputs (feature_set is None)
    search: str = ""      # how near-duplicates were searched (space and method)
    notes: list = field(default_factory=list)  # what was sampled or approximated, what could not be searched

    @property
    def n_leaks(self):
        return len(self.leaked_test)

    def summary(self):
        lines = [f"{self.features}: {len(self.duplicates)} near-duplicate pairs (cosine >= {self.threshold:g}) "
                 f"in {self.n_groups} groups; {self.n_leaks} test images have one in train/val",
                 f"{len(self.suspects)} label suspects, {self.n_flagged} flagged by cleanlab as likely wrong; "
                 "most suspicious: "
                 + (", ".join(f"{s.path} ({s.given} -> {s.suggested})" for s in self.suspects[:3]) or "none")]
        if len(self.curve) >= 2:
            last, before = self.curve[-1], self.curve[-2]
            lines.append(f"learning curve ({self.curve_features}, logreg): {before.n_per_class} -> "
                         f"{last.n_per_class} images per class: {before.accuracy_mean:.4f} -> "
                         f"{last.accuracy_mean:.4f}; doubling the images per class is expected to add "
                         f"{100 * self.doubling_gain:+.1f} points")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"-> {self.folder}/ (duplicates.csv, suspects.csv, learning_curve.csv, "
                     "learning_curve.png, summary.json)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- near-duplicates


@dataclass(frozen=True)
class SearchSpace:
    """How the near-duplicate search saw the images: ``space`` (``whitened to K axes`` or
    ``centred``), ``method`` (exact or IVF) and a ``warning`` when it could look only roughly."""

    space: str
    method: str
    warning: str = ""

    def describe(self):
        return f"{self.method} search on the {self.space} features"


def search_method(n_rows, *, exact_max_rows=EXACT_MAX_ROWS):
    """The name of the search ``similar_pairs`` runs on ``n_rows`` rows."""
    if n_rows <= exact_max_rows:
        return "exact (faiss flat index, every pair)" if _faiss() else "exact (blocked matrix products, every pair)"
    if _faiss():
        cells = _ivf_cells(n_rows)
        return f"approximate (faiss IVF, {min(IVF_PROBES, cells)} of {cells} cells searched per image)"
    return "exact (blocked matrix products; faiss is not installed)"


def similar_pairs(X, threshold, *, exact_max_rows=EXACT_MAX_ROWS, block_bytes=BLOCK_BYTES, quiet=True):
    """Pairs of rows whose cosine is at least ``threshold``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Rows are L2-normalised here.
    threshold : float
    exact_max_rows : int
        Up to this many rows every pair is checked (faiss's flat index, else blocked matrix
        products, memory bounded by ``block_bytes``); past it faiss's IVF index (``IVF_PROBES``
        nearest cells of about sqrt(n) per row) finds the pairs.
    quiet : bool
        No progress bar (rows searched, on stderr).

    Returns
    -------
    i, j : ndarray of shape (n_pairs,), int64, with i < j
    cosine : ndarray of shape (n_pairs,), float32
    """
    from .chunks import progress

    X = np.ascontiguousarray(l2_normalize(X))
    faiss = _faiss()
    with progress(len(X), "near-duplicates", quiet) as bar:
        if faiss is None:
            if len(X) > exact_max_rows:
                warnings.warn(f"{len(X)} images and faiss is not installed (pip install 'featurepipe[audit]'): "
                              "checking every pair, which takes long", stacklevel=2)
            i, j, cos = _exact_pairs(X, threshold, block_bytes=block_bytes, bar=bar)
        else:
            index = faiss.IndexFlatIP(X.shape[1]) if len(X) <= exact_max_rows else _ivf_index(faiss, X)
            i, j, cos = _range_pairs(index, X, threshold, block_bytes=block_bytes, bar=bar)
    order = np.lexsort((j, i, -cos))
    return i[order], j[order], cos[order]


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _exact_pairs(X, threshold, *, block_bytes, bar):
    n = len(X)
    rows = max(1, min(n, block_bytes // (4 * max(n, 1))))
    found = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = X[start:stop] @ X[start:].T  # only columns >= start: each pair once
        a, b = np.nonzero(np.triu(sims >= threshold, k=1))
        found.append((a + start, b + start, sims[a, b]))
        bar.update(stop - start)
    return _stack(found)


def _ivf_cells(n_rows):
    return int(np.clip(min(np.sqrt(n_rows), n_rows // 40), 1, 1024))  # faiss wants >= 39 rows per cell


def _ivf_index(faiss, X, *, seed=0):
    """An IVF index of ``X`` (inner product), trained on a sample of at most 50 rows per cell."""
    cells = _ivf_cells(len(X))
    quantizer = faiss.IndexFlatIP(X.shape[1])
    index = faiss.IndexIVFFlat(quantizer, X.shape[1], cells, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = X if len(X) <= 50 * cells else X[np.sort(rng.choice(len(X), 50 * cells, replace=False))]
    index.train(np.ascontiguousarray(sample))
    index.nprobe = min(IVF_PROBES, cells)
    index.add(X)
    return index


def _range_pairs(index, X, threshold, *, block_bytes, bar):
    """Every (i, j > i) with inner product >= threshold that ``index`` finds, a block of queries at a time."""
    if index.ntotal == 0:
        index.add(X)
    rows = max(1, block_bytes // (4 * X.shape[1]) // 8)
    found = []
    for start in range(0, len(X), rows):
        lims, sims, nbrs = index.range_search(X[start:start + rows], float(threshold))
        a = np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64)) + start
        keep = nbrs > a
        found.append((a[keep], nbrs[keep], sims[keep]))
        bar.update(len(lims) - 1)
    return _stack(found)


def _stack(found):
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, c = (np.concatenate(parts) for parts in zip(*found))
    return i.astype(np.int64), j.astype(np.int64), c.astype(np.float32)


def whitened(X, *, dims=WHITEN_DIMS, fit_rows=WHITEN_FIT_ROWS, seed=0):
    """Rows projected on their main axes, each axis scaled to unit variance (PCA whitening).

    Pooled CNN features share large common directions, so the plain cosine of two different
    photos of one class is already high (0.9 and more on flowers5); whitening puts the weight on
    what distinguishes one photo from another, which separates copies from distinct photos
    (docs/audit.md). PCA is fitted on at most ``fit_rows`` rows (a random sample), then applied
    block by block, with at most ``dims`` axes and at most one axis per ``ROWS_PER_WHITENED_DIM``
    rows: whitening as many axes as there are rows makes every pair of rows equally far apart
    (every cosine -1/(n-1)), so nothing could be found. With fewer than ``MIN_WHITENED_DIMS``
    axes to spare (and fewer than the features' own), the rows are only centred (mean removed),
    which takes away the common direction but not the rest.

    Returns
    -------
    X : ndarray of shape (n_samples, <= dims), float32
    space : str
        ``whitened to K axes`` or ``centred``.
    """
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample = X if len(X) <= fit_rows else X[np.sort(rng.choice(len(X), fit_rows, replace=False))]
    k = min(dims, X.shape[1], len(sample) // ROWS_PER_WHITENED_DIM)
    rows = max(1, BLOCK_BYTES // (4 * X.shape[1]))
    if k < min(MIN_WHITENED_DIMS, X.shape[1]) or k < 1:
        mean = sample.mean(axis=0)
        return np.vstack([X[s:s + rows] - mean for s in range(0, len(X), rows)]).astype(np.float32), "centred"
    # two power iterations instead of sklearn's default: a quarter of the time, the same pairs
    pca = PCA(n_components=k, whiten=True, random_state=seed, iterated_power=2,
              svd_solver="randomized" if k < min(sample.shape) // 2 else "full").fit(sample)
    keep = pca.explained_variance_ > 1e-6 * pca.explained_variance_[0]  # no division by ~0
    out = np.vstack([pca.transform(X[s:s + rows])[:, keep] for s in range(0, len(X), rows)]).astype(np.float32)
    return out, f"whitened to {out.shape[1]} axes"


def find_duplicates(fs, *, threshold=DEFAULT_THRESHOLD, exact_max_rows=EXACT_MAX_ROWS, quiet=True):
    """Near-duplicate pairs of a ``FeatureSet`` (cosine of the whitened features).

    Returns
    -------
    pairs : list of DuplicatePair, highest cosine first
    n_groups : int
    search : SearchSpace
    """
    Xw, space = whitened(fs.X)
    warning = "" if space != "centred" else (
        f"only {len(fs.X)} images: too few to whiten the features (>= {ROWS_PER_WHITENED_DIM * MIN_WHITENED_DIMS} "
        "needed), so near-duplicates were searched on the centred features, where distinct photos of a "
        "class score higher than after whitening: check the pairs near the threshold")
    search = SearchSpace(space=space, method=search_method(len(Xw), exact_max_rows=exact_max_rows), warning=warning)
    i, j, cos = similar_pairs(Xw, threshold, exact_max_rows=exact_max_rows, quiet=quiet)
    pairs = [DuplicatePair(str(fs.paths[a]), str(fs.paths[b]), str(fs.split[a]), str(fs.split[b]), float(c))
             for a, b, c in zip(i, j, cos)]
    return pairs, _count_groups(len(fs.paths), i, j), search


def _count_groups(n, i, j):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return 0
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    members = np.unique(np.concatenate([i, j]))
    return len(np.unique(component[members]))


def leaked_test_paths(pairs):
    """Test images with a near-duplicate in train or val, sorted."""
    leaked = set()
    for p in pairs:
        if p.split_a == "test" and p.split_b != "test":
            leaked.add(p.path_a)
        if p.split_b == "test" and p.split_a != "test":
            leaked.add(p.path_b)
    return sorted(leaked)


# --------------------------------------------------------------------------- leak-adjusted scores


def rescore_without_leaks(folder, files, leaked, *, loaded=None):
    """Fill ``test_accuracy_no_leaks`` of every results row whose model can be scored again.

    With no leaks it is the test accuracy. Otherwise each row's saved model (checked by
    ``featurepipe.modelfile.load_written``) predicts the test
    rows of its feature set (the given files, joined by name) minus ``leaked``. Returns the number
    of rows filled; rows that cannot be scored (fine-tuned models, files not given) are left blank.
    ``loaded``: a FeatureSet already in memory, used instead of loading its files again.
    """
    rows = read_results(folder)
    if not rows:
        return 0
    stems = {Path(f).stem: Path(f) for f in files}
    leaked = set(leaked)
    sets, filled = {}, 0
    if loaded is not None and leaked:
        keep = np.flatnonzero((loaded.split == "test") & ~np.isin(loaded.paths, list(leaked)))
        sets[tuple(loaded.name.split("+"))] = (loaded.X[keep], loaded.y[keep])
    for row in rows:
        value = row.get("test_accuracy", "") if not leaked else _accuracy_without(row, stems, leaked, sets, folder)
        row["test_accuracy_no_leaks"] = value
        filled += value not in ("", None)
    update_results(folder, rows)
    return filled


def _accuracy_without(row, stems, leaked, sets, folder):
    from .modelfile import ModelRefused, is_features_model
    from .predict import load_bundle

    names = str(row.get("features", "")).split("+")
    model_path = Path(str(row.get("model", "")))
    if not is_features_model(model_path) or not model_path.is_file() or not all(n in stems for n in names):
        return ""
    key = tuple(names)
    if key not in sets:  # only the test rows without a leak are kept: memory for a few sets at scale
        fs = load_feature_set([stems[n] for n in names])
        keep = np.flatnonzero((fs.split == "test") & ~np.isin(fs.paths, list(leaked)))
        sets[key] = (fs.X[keep], fs.y[keep])
        del fs
    X, y = sets[key]
    if len(y) == 0:
        return ""
    try:
        model = load_bundle(model_path, written_in=folder, sha256=row.get("model_sha256"))["model"]
        pred = model.classes_[np.argmax(model.predict_proba(X), axis=1)]
    except ModelRefused:
        raise
    except Exception as err:  # one stale or broken model must not stop the audit
        warnings.warn(f"{model_path.name}: not scored again ({type(err).__name__}: {err})", stacklevel=2)
        return ""
    return f"{float(np.mean(pred == y)):.6g}"


# --------------------------------------------------------------------------- label suspects


def _logreg(n_samples, n_features, seed, C=None):
    pipeline = CLASSIFIERS["logreg"].make(n_samples=n_samples, n_features=n_features, seed=seed)
    return pipeline.set_params(clf__C=C) if C else pipeline


def out_of_fold_probabilities(fs, *, C=None, folds=SUSPECT_FOLDS, seed=0, n_jobs=-1):
    """Probabilities no model saw the answer of: cross-validated on train/val, and from a model
    fitted on all of train/val for test.

    Returns
    -------
    proba : ndarray of shape (n_samples, n_classes), float32
    model : the pipeline fitted on all train/val rows (None without test rows)
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    train = np.flatnonzero(fs.split != "test")
    test = np.flatnonzero(fs.split == "test")
    smallest = int(np.bincount(fs.y[train], minlength=len(fs.class_names))[np.unique(fs.y[train])].min())
    folds = min(folds, smallest)
    if folds < 2:
        raise DataError("a class has a single train image; label suspects need two per class")
    pipeline = _logreg(len(train), fs.X.shape[1], seed, C)
    proba = np.zeros((len(fs.y), len(fs.class_names)), np.float32)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba[train] = _full_columns(cross_val_predict(pipeline, fs.X[train], fs.y[train], cv=cv,
                                                   method="predict_proba", n_jobs=n_jobs),
                                 np.unique(fs.y[train]), len(fs.class_names))
    if len(test):
        pipeline.fit(fs.X[train], fs.y[train])
        proba[test] = _full_columns(pipeline.predict_proba(fs.X[test]), pipeline.classes_, len(fs.class_names))
    return proba, pipeline if len(test) else None


def _full_columns(proba, classes, n_classes):
    out = np.zeros((len(proba), n_classes), np.float32)
    out[:, classes] = proba
    return out


def rank_suspects(fs, proba, *, batched=False):
    """Images whose features disagree with their label, most suspicious first.

    Listed: every image whose most probable class is not its given one, and every image cleanlab's
    ``find_label_issues`` flags (its estimate of the wrong labels, confident-learning pruning).
    Ranked by cleanlab's self-confidence label quality (the probability of the given label), the
    ranking that found 96 % of planted wrong labels in flowers5 (docs/audit.md); ``score`` = 1 -
    quality.

    Returns
    -------
    suspects : list of Suspect
    n_flagged : int
        The images ``find_label_issues`` flags (``batched``: cleanlab's
        ``find_label_issues_batched``, the variant for large sets, 10,000 rows at a time).
    """
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(fs.y)
    if len(present) < 2:
        return [], 0
    # cleanlab wants labels 0..k-1 with every class present
    remap = np.full(len(fs.class_names), -1)
    remap[present] = np.arange(len(present))
    labels = remap[fs.y]
    sub = proba[:, present]
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
    quality = get_label_quality_scores(labels, sub, method="self_confidence")
    flagged = _flag_label_issues(labels, sub, batched=batched)
    listed = np.flatnonzero(flagged | (np.argmax(sub, axis=1) != labels))
    listed = listed[np.lexsort((fs.paths[listed], quality[listed]))]
    suspects = [Suspect(path=str(fs.paths[i]), split=str(fs.split[i]), given=fs.class_names[fs.y[i]],
                        suggested=fs.class_names[present[int(np.argmax(sub[i]))]], score=float(1 - quality[i]))
                for i in listed]
    return suspects, int(flagged.sum())


def _flag_label_issues(labels, proba, *, batched):
    """cleanlab's estimate of the wrong labels, a boolean mask; single-process (no workers to orphan)."""
    if batched:
        from cleanlab.experimental.label_issues_batched import find_label_issues_batched

        return find_label_issues_batched(labels, proba, batch_size=10_000, n_jobs=1, verbose=False,
                                         return_mask=True)
    from cleanlab.filter import find_label_issues

    return find_label_issues(labels, proba, n_jobs=1)


def main_axes(fs, *, dims=None, fit_rows=WHITEN_FIT_ROWS, seed=0):
    """The feature set with its rows projected on their ``dims`` (default ``LARGE_PCA_DIMS``) main
    axes (PCA fitted on a sample of at most ``fit_rows`` train rows; no labels used): the cheap
    input of the audit's models at scale. Returns (FeatureSet with X of shape (n_samples, <= dims),
    float32; a sentence saying so)."""
    from dataclasses import replace

    from sklearn.decomposition import PCA

    dims = LARGE_PCA_DIMS if dims is None else dims
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(fs.split != "test")
    sample = train if len(train) <= fit_rows else np.sort(rng.choice(train, fit_rows, replace=False))
    k = max(1, min(dims, fs.X.shape[1], len(sample) - 1))
    pca = PCA(n_components=k, svd_solver="randomized", iterated_power=2, random_state=seed).fit(fs.X[sample])
    rows = max(1, BLOCK_BYTES // (4 * fs.X.shape[1]))
    X = np.vstack([pca.transform(fs.X[s:s + rows]) for s in range(0, len(fs.X), rows)]).astype(np.float32)
    return replace(fs, X=X), f"{k} main axes (PCA fitted on {len(sample):,} train rows)"


# --------------------------------------------------------------------------- learning curve


def learning_curve(fs, *, C=None, sizes=CURVE_SIZES, seeds=CURVE_SEEDS, n_jobs=-1, full_model=None,
                   max_train_rows=None, max_test_rows=None, seed=0):
    """Test accuracy of logistic regression trained on n images per class (train/val rows).

    Each size below the smallest class runs ``seeds`` times on a random sample of n images per
    class; the last point trains on every train/val row (one run: nothing to sample;
    ``full_model`` is used when it is that model already fitted). At scale, ``max_train_rows``
    leaves out the sampled sizes of more rows than that and ``max_test_rows`` scores every point on
    one seeded sample of that many test rows. Returns a list of CurvePoint.
    """
    from joblib import Parallel, delayed

    train = np.flatnonzero(fs.split != "test")
    test = np.flatnonzero(fs.split == "test")
    if len(test) == 0:
        return []
    if max_test_rows is not None and len(test) > max_test_rows:
        test = np.sort(np.random.default_rng(seed).choice(test, max_test_rows, replace=False))
    counts = np.bincount(fs.y[train], minlength=len(fs.class_names))
    smallest = int(counts[counts > 0].min())
    levels = [n for n in sizes if n < smallest
              and (max_train_rows is None or n * np.count_nonzero(counts) <= max_train_rows)]
    jobs = [(n, s) for n in levels for s in range(seeds)]
    X_test, y_test = fs.X[test], fs.y[test]
    pools = {c: train[fs.y[train] == c] for c in np.unique(fs.y[train])}
    picks = [_curve_rows(pools, n, s) for n, s in jobs]
    scores = Parallel(n_jobs=n_jobs)(delayed(_curve_fit)(fs.X[rows], fs.y[rows], X_test, y_test, s, C)
                                     for rows, (_, s) in zip(picks, jobs))
    points = []
    for n in levels:
        acc = np.array([score for (m, _), score in zip(jobs, scores) if m == n])
        points.append(CurvePoint(n, float(acc.mean()), float(acc.std()), len(acc)))
    if full_model is None:
        full_model = _logreg(len(train), fs.X.shape[1], 0, C).fit(fs.X[train], fs.y[train])
    full = float(np.mean(full_model.predict(X_test) == y_test))
    points.append(CurvePoint(int(round(len(train) / np.count_nonzero(counts))), full, 0.0, 1))
    return points


def _curve_rows(pools, n, seed):
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(rows, n, replace=False) for rows in pools.values()]))


def _curve_fit(X, y, X_test, y_test, seed, C):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence on a handful of rows is not the point here
        model = _logreg(len(X), X.shape[1], seed, C).fit(X, y)
    return float(np.mean(model.predict(X_test) == y_test))


def doubling_gain(points, last=3):
    """Accuracy added per doubling of the images per class: the slope of the last ``last`` points'
    mean accuracy against log2(images per class)."""
    pts = points[-last:]
    if len(pts) < 2:
        return math.nan
    x = np.log2([p.n_per_class for p in pts])
    y = np.array([p.accuracy_mean for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot_learning_curve(points, path, *, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p.n_per_class for p in points]
    mean = np.array([p.accuracy_mean for p in points])
    std = np.array([p.accuracy_std for p in points])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(n, mean, "o-", color="#4c72b0", label="test accuracy (mean of seeds)")
    ax.fill_between(n, mean - std, mean + std, color="#4c72b0", alpha=0.2, label="± std")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("train images per class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, float(np.min(mean - std)) - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(plain(title), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- orchestration


def _logreg_C(rows, name):
    """The C of compare's logreg row on feature set ``name``, if there is one."""
    for r in rows:
        if r.get("features") == name and r.get("clf") == "logreg" and str(r.get("best_params", "")).startswith("C="):
            try:
                return float(r["best_params"].split(",")[0][2:])
            except ValueError:
                return None
    return None


def audit(features=None, *, threshold=DEFAULT_THRESHOLD, seeds=CURVE_SEEDS, seed=0, n_jobs=-1,
          exact_max_rows=EXACT_MAX_ROWS, large_rows=LARGE_ROWS, quiet=True, reuse=False):
    """Audit the data behind one or more feature files; write ``models/<dataset>/audit/``.

    Parameters
    ----------
    features : list of str or Path, optional
        Feature files (joined by path); default: those of the latest extract run.
    threshold : float
        Cosine (of the joined, L2-normalised features) from which two images are near-duplicates.
    seeds : int
        Runs per learning-curve size.
    seed : int
        Folds of the out-of-fold probabilities.
    n_jobs : int
        Parallel fits (-1: all cores). Their worker processes die with this process.
    exact_max_rows : int
        Past this many images the duplicate search uses faiss's IVF index instead of checking
        every pair.
    large_rows : int
        Past this many images the audit takes its bounded paths (``AuditResult.notes`` and
        ``summary.json`` say which): label suspects and the learning curve from logistic
        regression on the features' ``LARGE_PCA_DIMS`` main axes with ``LARGE_FOLDS`` folds,
        cleanlab's batched search, curve points of at most ``CURVE_MAX_TRAIN_ROWS`` rows scored
        on at most ``CURVE_MAX_TEST_ROWS`` test rows.
    quiet : bool
        No progress lines on stderr.
    reuse : bool
        Return the audit already written when it was made from the same feature files, results
        rows and settings (``summary.json``'s ``key``) instead of computing it again.

    Returns
    -------
    AuditResult
    """
    from .children import loky_workers_die_with_parent

    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    _require("cleanlab")
    files = resolve_feature_files(features)
    fs = load_feature_set(files)
    if len(np.unique(fs.y[fs.split != "test"])) < 2:
        raise DataError(f"the train rows of {fs.name} hold fewer than two classes; nothing to audit")
    folder = models_dir_for(files[0], claim=True)
    out = folder / "audit"
    key = _audit_key(files, read_results(folder), threshold=threshold, seeds=seeds, seed=seed,
                     exact_max_rows=exact_max_rows, large_rows=large_rows)
    saved = saved_audit(out, key) if reuse else None
    if saved is not None:
        return saved
    out.mkdir(parents=True, exist_ok=True)
    with loky_workers_die_with_parent():
        result = _run_audit(fs, files, folder, out, threshold=threshold, seeds=seeds, seed=seed, n_jobs=n_jobs,
                            exact_max_rows=exact_max_rows, large_rows=large_rows, quiet=quiet)
    _write_summary(result, fs, key)
    return result


def _run_audit(fs, files, folder, out, *, threshold, seeds, seed, n_jobs, exact_max_rows, large_rows, quiet):
    started = time.perf_counter()
    say = (lambda msg: None) if quiet else (
        lambda msg: print(f"audit: {msg} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True))
    large = len(fs.paths) > large_rows
    notes = []

    say("near-duplicates")
    pairs, n_groups, search = find_duplicates(fs, threshold=threshold, exact_max_rows=exact_max_rows, quiet=quiet)
    notes += [search.warning] if search.warning else []
    if not search.method.startswith("exact"):
        notes.append(f"near-duplicates: {search.method}: a pair can be missed")
    leaked = leaked_test_paths(pairs)
    _write_csv(out / "duplicates.csv", DUPLICATE_COLUMNS, [asdict(p) for p in pairs])
    say("leak-adjusted scores")
    rescored = rescore_without_leaks(folder, files, leaked, loaded=fs)

    rows = read_results(folder)
    C = _logreg_C(rows, fs.name)
    model_fs, folds = fs, SUSPECT_FOLDS
    if large:
        say("main axes")
        model_fs, axes = main_axes(fs, seed=seed)
        folds = LARGE_FOLDS
        notes.append(f"{len(fs.paths):,} images (more than {large_rows:,}): label suspects from {folds}-fold "
                     f"logistic regression on the features' {axes}, cleanlab's batched label-issue search")
    say("label suspects")
    proba, full_model = out_of_fold_probabilities(model_fs, C=C, folds=folds, seed=seed, n_jobs=n_jobs)
    suspects, n_flagged = rank_suspects(fs, proba, batched=large)
    del proba
    _write_csv(out / "suspects.csv", SUSPECT_COLUMNS, [asdict(s) for s in suspects])

    say("learning curve")
    curve_fs = _best_feature_set(current_rows(rows, folder), files, fs)
    curve_C = _logreg_C(rows, curve_fs.name)
    reuse_full = curve_fs is fs
    if large:
        curve_fs = model_fs if curve_fs is fs else main_axes(curve_fs, seed=seed)[0]
        notes.append(f"learning curve on the same main axes, points of at most {CURVE_MAX_TRAIN_ROWS:,} train "
                     f"rows, each scored on {CURVE_MAX_TEST_ROWS:,} test rows at most (a seeded sample)")
    curve = learning_curve(curve_fs, C=curve_C, seeds=seeds, n_jobs=n_jobs,
                           full_model=full_model if reuse_full else None,
                           max_train_rows=CURVE_MAX_TRAIN_ROWS if large else None,
                           max_test_rows=CURVE_MAX_TEST_ROWS if large else None, seed=seed)
    _write_csv(out / "learning_curve.csv", CURVE_COLUMNS,
               [dict(features=curve_fs.name, clf="logreg", **asdict(p)) for p in curve])
    gain = doubling_gain(curve)
    if curve:
        plot_learning_curve(curve, out / "learning_curve.png",
                            title=f"{fs.dataset}: {curve_fs.name} / logreg; doubling adds {100 * gain:+.1f} points")
    say("done")
    return AuditResult(folder=out, features=fs.name, threshold=threshold, duplicates=pairs, n_groups=n_groups,
                       leaked_test=leaked, suspects=suspects, n_flagged=n_flagged, curve_features=curve_fs.name,
                       curve=curve, doubling_gain=gain, rows_rescored=rescored, feature_set=fs,
                       search=search.describe(), notes=notes)


def _audit_key(files, rows, **settings):
    """A digest of what an audit depends on: the files (by size and mtime), the rows' inputs, settings."""
    import hashlib
    import json

    from . import __version__

    parts = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    rows = sorted((r.get("features", ""), r.get("clf", ""), r.get("key", "")) for r in rows)
    blob = json.dumps({"files": parts, "rows": rows, "settings": settings, "version": __version__},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def saved_audit(folder, key):
    """The AuditResult written in ``folder`` with this ``key`` (read back from its files), or None."""
    import json

    try:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        if summary.get("key") != key:
            return None
        pairs = [DuplicatePair(r["path_a"], r["path_b"], r["split_a"], r["split_b"], float(r["cosine"]))
                 for r in _read_csv(Path(folder) / "duplicates.csv")]
        suspects = [Suspect(r["path"], r["split"], r["given"], r["suggested"], float(r["score"]))
                    for r in _read_csv(Path(folder) / "suspects.csv")]
        curve = [CurvePoint(int(r["n_per_class"]), float(r["accuracy_mean"]), float(r["accuracy_std"]),
                            int(r["n_seeds"])) for r in _read_csv(Path(folder) / "learning_curve.csv")]
    except (OSError, ValueError, KeyError):
        return None
    gain = summary.get("doubling_gain")
    return AuditResult(folder=Path(folder), features=summary["features"], threshold=summary["threshold"],
                       duplicates=pairs, n_groups=summary["duplicate_groups"], leaked_test=leaked_test_paths(pairs),
                       suspects=suspects, n_flagged=summary["suspects_flagged"],
                       curve_features=summary["curve_features"], curve=curve,
                       doubling_gain=math.nan if gain is None else gain,
                       rows_rescored=summary["rows_rescored"], reused=True,
                       search=summary.get("duplicate_search", ""), notes=list(summary.get("notes", [])))


def _read_csv(path):
    with open(path, newline="") as fh:
        return [unescape_row(r) for r in csv.DictReader(fh)]


def _require(module):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"the audit needs {module}: pip install 'featurepipe[audit]'")


def _best_feature_set(rows, files, joined):
    """The feature set of the best results row by CV (``ranked``) that the given files can
    rebuild (else all joined)."""
    from .modelfile import is_features_model

    stems = {Path(f).stem: Path(f) for f in files}
    for r in ranked(rows):
        if not can_be_chosen(r):
            continue
        names = str(r.get("features", "")).split("+")
        if is_features_model(r.get("model", "")) and all(n in stems for n in names):
            return joined if "+".join(names) == joined.name else load_feature_set([stems[n] for n in names])
    return joined


def _write_csv(path, columns, rows):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = dict_writer(fh, columns)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    os.replace(tmp, path)


def _write_summary(result, fs, key):
    last = result.curve[-1] if result.curve else None
    write_json_atomic(result.folder / "summary.json", {
        "key": key, "features": result.features, "n_images": int(len(fs.paths)), "threshold": result.threshold,
        "duplicate_pairs": len(result.duplicates), "duplicate_groups": result.n_groups,
        "cross_split_pairs": sum(p.split_a != p.split_b for p in result.duplicates),
        "leaked_test_images": result.n_leaks, "n_test": int(np.sum(fs.split == "test")),
        "suspects": len(result.suspects), "suspects_flagged": result.n_flagged, "rows_rescored": result.rows_rescored,
        "curve_features": result.curve_features,
        "curve_last": None if last is None else asdict(last),
        "doubling_gain": None if math.isnan(result.doubling_gain) else result.doubling_gain,
        "duplicate_search": result.search, "notes": list(result.notes),
    })


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(prog="python -m featurepipe.audit",
                      description="Near-duplicates and leaks, label suspects and a learning curve from feature "
                                  "files -> models/<dataset>/audit/.")
    p.add_argument("--features", nargs="+", metavar="F.h5",
                   help="feature files (default: those of the latest extract run)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine from which two images are near-duplicates (default {DEFAULT_THRESHOLD})")
    p.add_argument("--seeds", type=int, default=CURVE_SEEDS, help=f"runs per learning-curve size (default {CURVE_SEEDS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=-1, help="parallel fits (default -1: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = audit(args.features, threshold=args.threshold, seeds=args.seeds, seed=args.seed,
                   n_jobs=args.n_jobs, quiet=args.quiet)
    if result.n_leaks:
        print(f"warning: {result.n_leaks} test images have a near-duplicate in train/val; results.csv's "
              "test_accuracy_no_leaks scores each model without them", file=sys.stderr)
    print(result.summary())
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
