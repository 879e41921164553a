"""The classifier registry: scikit-learn pipelines with small default grids.

``CLASSIFIERS`` maps a name to a ``ClassifierSpec``. ``spec.make(n_samples=, n_features=,
seed=)`` returns a fresh, unfitted ``Pipeline`` with fixed step names — ``scale``, an optional
``pca``, ``clf`` — so every grid reads ``clf__C`` or ``pca__n_components``. Solver settings are
chosen from the shape of the data (e.g. LinearSVC's ``dual`` from samples vs features; PCA is
capped by both). ``get_classifier("package.module:ClassName")`` wraps any scikit-learn compatible
estimator the same way.

The input rows are L2-normalised feature blocks (see ``featurepipe.fit``); ``scale`` standardises
each column so that one ``C`` grid suits every backbone (``BlockwiseStandardScaler``: fitted a
block of rows at a time, so a float32 matrix is never copied to float64).

Size-aware: ``build`` sees the number of training rows and picks the bounded variant above the
measured crossovers (docs/fit.md, "Classifiers at scale"): ``svm-rbf`` becomes a Nystroem map +
ridge classifier above ``exact_rbf_max_rows()``, ``knn`` searches a faiss IVF index of 8-bit codes above
``exact_knn_max_rows()``, ``logreg`` caps its iterations, ``rf`` bootstraps capped samples.
``spec.note(n_samples, n_features)`` says which variant was built (shown in the results table);
``spec.cost(...)`` estimates the peak memory and time of one fit (``featurepipe.budget``).
"""

import ast
import importlib
import os
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .errors import UsageError
from .estimators import BlockwiseStandardScaler, FaissKNN, ScaledNystroem, ivf_lists  # noqa: F401  (re-exported)

PCA_DIMS = 64

# Crossovers (docs/fit.md, "Classifiers at scale"); lowerable through the environment (tests).
EXACT_RBF_MAX_ROWS = 12_000      # exact kernel SVM up to this many training rows
NYSTROEM_COMPONENTS = 2048       # the Nystroem map's size above it
EXACT_KNN_MAX_ROWS = 50_000      # exact faiss search (IndexFlatIP) up to this many rows, IVF above
RF_MAX_SAMPLES = 20_000          # rows bootstrapped per tree


def _env_int(name, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def exact_rbf_max_rows():
    """Training rows up to which ``svm-rbf`` is the exact kernel SVM (``FEATUREPIPE_EXACT_RBF_MAX_ROWS``)."""
    return _env_int("FEATUREPIPE_EXACT_RBF_MAX_ROWS", EXACT_RBF_MAX_ROWS)


def exact_knn_max_rows():
    """Training rows up to which ``knn`` searches exactly (``FEATUREPIPE_EXACT_KNN_MAX_ROWS``)."""
    return _env_int("FEATUREPIPE_EXACT_KNN_MAX_ROWS", EXACT_KNN_MAX_ROWS)


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier: a pipeline factory and its default grid.

    Attributes
    ----------
    name : str
    build : callable
        ``build(n_samples, n_features, seed) -> list of (step name, estimator)``.
    grid : dict of str to list
        Default parameter grid, e.g. ``{"clf__C": [0.01, 0.1]}``: the values that won in the
        measurements (docs/fit.md), few enough for the fast default run.
    full_grid : dict of str to list, optional
        The wider grid of the exhaustive sweep (``compare --all``); default: ``grid``.
    description : str
    cost : callable, optional
        ``cost(n_samples, n_features, n_classes) -> featurepipe.budget.Cost`` of one fit.
    note : callable, optional
        ``note(n_samples, n_features) -> str``: the bounded variant built at that size, or "".
    bounded_grid, bounded_full_grid : dict, optional
        The grids of the bounded variant (when ``note`` is not empty), if its parameters differ.
    """

    name: str
    build: object
    grid: dict = field(default_factory=dict)
    description: str = ""
    full_grid: dict = None
    cost: object = None
    note: object = None
    bounded_grid: dict = None
    bounded_full_grid: dict = None

    def note_for(self, *, n_samples, n_features):
        """What the size changed (e.g. ``"nystroem 2048"``), or "" for the small-data pipeline."""
        return self.note(int(n_samples), int(n_features)) if self.note else ""

    def cost_for(self, *, n_samples, n_features, n_classes):
        """``budget.Cost`` of one fit on (n_samples, n_features) with n_classes, or None if unknown."""
        return self.cost(int(n_samples), int(n_features), int(n_classes)) if self.cost else None

    def grid_for(self, full=False, *, n_samples=0, n_features=0):
        """The default grid, or the exhaustive sweep's with ``full``; the bounded variant's grids
        when (n_samples, n_features) makes ``build`` choose it."""
        if self.bounded_grid is not None and self.note_for(n_samples=n_samples, n_features=n_features):
            return dict(self.bounded_full_grid if full and self.bounded_full_grid else self.bounded_grid)
        return dict(self.full_grid if full and self.full_grid is not None else self.grid)

    def make(self, *, n_samples, n_features, seed=0):
        """A fresh, unfitted Pipeline for data of shape (n_samples, n_features)."""
        from sklearn.pipeline import Pipeline

        return Pipeline(self.build(int(n_samples), int(n_features), seed))


def _scaler():
    return BlockwiseStandardScaler()


def _pca(n_samples, n_features, seed, dims=PCA_DIMS):
    from sklearn.decomposition import PCA

    n = max(1, min(dims, n_features, n_samples - 1))
    return PCA(n_components=n, svd_solver="randomized" if n < min(n_samples, n_features) // 2 else "full",
               random_state=seed)


def _svm(n_samples, n_features, seed):
    from sklearn.svm import LinearSVC

    # liblinear's dual solver is the faster one on deep features (measured on flowers5, 3 k rows
    # of 512-3072 features, small C); the primal only pays off with many more samples than features.
    return [("scale", _scaler()),
            ("clf", LinearSVC(C=0.001, dual=n_samples < 10 * n_features, tol=1e-3, max_iter=5000,
                              random_state=seed))]


class RBFKernel(TransformerMixin, BaseEstimator):
    """Rows of the RBF kernel against the training rows: ``exp(-gamma * |x - x_i|^2)``.

    With ``SVC(kernel="precomputed")`` after it, this is ``SVC(kernel="rbf")`` with the kernel
    computed by one matrix product (float32 BLAS) instead of libsvm's row-by-row loops: the same
    model and predictions, 10-20x faster on deep features (benchmarks/classifier_choice.py).

    Parameters
    ----------
    gamma : float or "scale", default="scale"
        ``"scale"`` is ``1 / (n_features * X.var())``, as for ``SVC(gamma="scale")``.
    """

    def __init__(self, *, gamma="scale"):
        self.gamma = gamma

    def fit(self, X, y=None):
        """Keep the training rows ``X`` of shape (n_samples, n_features); returns self."""
        X = np.asarray(X, dtype=np.float32)
        if self.gamma != "scale" and not float(self.gamma) > 0:
            raise ValueError(f"gamma must be 'scale' or > 0, got {self.gamma!r}")
        variance = float(X.var())
        self.gamma_ = (1.0 / (X.shape[1] * variance) if variance > 0 else 1.0) if self.gamma == "scale" \
            else float(self.gamma)
        self.X_fit_ = X
        self.sq_norms_ = np.einsum("ij,ij->i", X, X)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """The kernel of shape (n_rows, n_training_rows), float64 (what libsvm takes)."""
        check_is_fitted(self, "X_fit_")
        X = np.asarray(X, dtype=np.float32)
        d = np.einsum("ij,ij->i", X, X)[:, None] + self.sq_norms_[None, :] - 2.0 * (X @ self.X_fit_.T)
        np.maximum(d, 0.0, out=d)
        return np.exp(-self.gamma_ * d, dtype=np.float64)



def _svm_rbf(n_samples, n_features, seed):
    from sklearn.linear_model import RidgeClassifier
    from sklearn.svm import SVC

    if n_samples > exact_rbf_max_rows():
        # Bounded: the Nystroem map (same gamma rule) + a ridge classifier on it (kernel ridge /
        # least-squares SVM, one solve for every class): as accurate as the exact SVM on flowers5
        # and the fastest linear model on the map (docs/fit.md, "Classifiers at scale").
        m = min(NYSTROEM_COMPONENTS, n_samples)
        return [("scale", "passthrough"), ("kernel", ScaledNystroem(n_components=m, random_state=seed)),
                ("clf", RidgeClassifier(alpha=0.03))]
    # On L2-normalised blocks directly: standardising first costs 1-2 points of accuracy.
    return [("scale", "passthrough"), ("kernel", RBFKernel(gamma="scale")),
            ("clf", SVC(kernel="precomputed", C=10.0, cache_size=500, random_state=seed))]


def _svm_rbf_note(n_samples, n_features):
    return f"nystroem {min(NYSTROEM_COMPONENTS, n_samples)}" if n_samples > exact_rbf_max_rows() else ""


def _svm_rbf_cost(n, d, k):
    from .budget import BLAS_FLOPS, LOOP_FLOPS, Cost

    if n > exact_rbf_max_rows():
        m = min(NYSTROEM_COMPONENTS, n)
        # the map (float32), ridge's centred copy and Gram matrix; the map and the Gram are the time
        return Cost(memory=12.0 * n * m + 4.0 * m * d + 8.0 * m * m + 8.0 * n * k,
                    seconds=(2.0 * n * m * d + n * m * m) / BLAS_FLOPS)
    # float32 product and distances + the float64 kernel libsvm reads
    return Cost(memory=20.0 * n * n, seconds=2.0 * n * n * d / BLAS_FLOPS + 0.5 * k ** 0.5 * n * n / LOOP_FLOPS)


def _logreg(n_samples, n_features, seed):
    from sklearn.linear_model import LogisticRegression

    # lbfgs (multinomial, float32 kept) at every size; past 20,000 rows its iterations are capped
    # (each is a pass over all rows); a fit that stops there is counted in convergence_warnings.
    big = n_samples > 20_000
    return [("scale", _scaler()),
            ("clf", LogisticRegression(C=0.01, max_iter=100 if big else 1000, tol=1e-3, random_state=seed))]


def _logreg_note(n_samples, n_features):
    return "lbfgs max_iter 100" if n_samples > 20_000 else ""


def _logreg_cost(n, d, k):
    from .budget import BLAS_FLOPS, Cost

    iters = 100
    # the standardised copy (float32) and a few (n, k) float64 arrays of the loss
    return Cost(memory=4.0 * n * d + 24.0 * n * k, seconds=iters * 4.0 * n * d * k / BLAS_FLOPS)


def _nb(n_samples, n_features, seed):
    from sklearn.naive_bayes import GaussianNB

    # PCA decorrelates the features, which is what naive Bayes assumes.
    return [("scale", _scaler()), ("pca", _pca(n_samples, n_features, seed, dims=32)),
            ("clf", GaussianNB())]


def _nb_cost(n, d, k):
    from .budget import BLAS_FLOPS, Cost

    return Cost(memory=8.0 * n * d, seconds=20.0 * n * d * 128 / BLAS_FLOPS)


def _knn(n_samples, n_features, seed):
    # Cosine similarity on the L2-normalised blocks (faiss); standardising or PCA first made it worse.
    return [("scale", "passthrough"),
            ("clf", FaissKNN(n_neighbors=10, weights="distance", exact_max_rows=exact_knn_max_rows(), random_state=seed))]


def _knn_note(n_samples, n_features):
    if n_samples > exact_knn_max_rows():
        return f"faiss IVF-SQ8 {ivf_lists(n_samples)} lists, nprobe 32"
    return ""


def _knn_cost(n, d, k):
    from .budget import BLAS_FLOPS, Cost

    # the index (the rows in float32, or 8-bit codes above the exact size), held about four times
    # while skops saves it; the IVF's training sample (64 rows per list) is copied twice by faiss.
    # Predicting n / 4 rows against the index is the time.
    exact = n <= exact_knn_max_rows()
    index = (4.0 if exact else 1.0) * n * d
    training = 0.0 if exact else 2 * 4.0 * min(n, 64 * ivf_lists(n)) * d
    work = 2.0 * (n / 4) * n * d if exact else 2.0 * (n / 4) * d * (32 * n / ivf_lists(n))
    return Cost(memory=max(4 * index, index + training) + 8.0 * 16_384 * d, seconds=work / BLAS_FLOPS)


def _rf(n_samples, n_features, seed):
    from sklearn.ensemble import RandomForestClassifier

    # 64 PCA components: as accurate as the raw features here and several times faster. Each tree
    # bootstraps at most RF_MAX_SAMPLES rows, so its size (and the forest's) is bounded.
    return [("scale", _scaler()), ("pca", _pca(n_samples, n_features, seed, dims=64)),
            ("clf", RandomForestClassifier(n_estimators=100, max_features="sqrt", n_jobs=1,
                                           max_samples=min(n_samples, RF_MAX_SAMPLES) if n_samples > RF_MAX_SAMPLES else None,
                                           random_state=seed))]


def _rf_note(n_samples, n_features):
    return f"{RF_MAX_SAMPLES} rows per tree" if n_samples > RF_MAX_SAMPLES else ""


def _rf_cost(n, d, k):
    from .budget import BLAS_FLOPS, LOOP_FLOPS, Cost

    m = min(n, RF_MAX_SAMPLES)
    nodes = 100 * 2 * m  # 100 trees, at most ~2 nodes per bootstrapped row
    return Cost(memory=8.0 * n * d + nodes * (64 + 8 * k),
                seconds=20.0 * n * d * 64 / BLAS_FLOPS + 100 * m * np.log2(max(m, 2)) * 8 * 30 / LOOP_FLOPS)


def _mlp(n_samples, n_features, seed):
    from sklearn.neural_network import MLPClassifier

    # Early stopping holds out 10 % of the rows: only worth it when that is a real sample. Past
    # 20,000 rows the epochs are capped at 50 (each is a pass over all rows).
    return [("scale", _scaler()),
            ("clf", MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-2, early_stopping=n_samples >= 500,
                                  validation_fraction=0.1, n_iter_no_change=5,
                                  max_iter=50 if n_samples > 20_000 else 200, random_state=seed))]


def _mlp_note(n_samples, n_features):
    return "50 epochs at most" if n_samples > 20_000 else ""


def _mlp_cost(n, d, k):
    from .budget import BLAS_FLOPS, Cost

    epochs = 50 if n > 20_000 else 100
    return Cost(memory=16.0 * n * d + 8.0 * n * 256, seconds=epochs * 6.0 * n * (d * 256 + 256 * k) / BLAS_FLOPS)


def _svm_cost(n, d, k):
    from .budget import LOOP_FLOPS, Cost

    return Cost(memory=16.0 * n * d, seconds=20.0 * k * n * d / LOOP_FLOPS)


CLASSIFIERS = {
    "svm": ClassifierSpec(
        name="svm", build=_svm, grid={"clf__C": [0.001]}, full_grid={"clf__C": [0.0003, 0.001, 0.003, 0.01]},
        description="linear SVM (LinearSVC), sigmoid-calibrated probabilities", cost=_svm_cost),
    "svm-rbf": ClassifierSpec(
        name="svm-rbf", build=_svm_rbf, grid={"clf__C": [3.0, 10.0]},
        full_grid={"clf__C": [1.0, 3.0, 10.0, 30.0, 100.0]},
        description="RBF-kernel SVM (kernel by one matrix product; above "
                    f"{EXACT_RBF_MAX_ROWS:,} training rows a Nystroem map + ridge classifier), "
                    "sigmoid-calibrated probabilities",
        cost=_svm_rbf_cost, note=_svm_rbf_note,
        bounded_grid={"clf__alpha": [0.1, 0.03]}, bounded_full_grid={"clf__alpha": [0.3, 0.1, 0.03, 0.01, 0.003]}),
    "logreg": ClassifierSpec(
        name="logreg", build=_logreg, grid={"clf__C": [0.003, 0.01, 0.03]},
        full_grid={"clf__C": [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]},
        description="multinomial logistic regression (lbfgs)", cost=_logreg_cost, note=_logreg_note),
    "nb": ClassifierSpec(
        name="nb", build=_nb, grid={"pca__n_components": [32]}, full_grid={"pca__n_components": [16, 32, 64, 128]},
        description="Gaussian naive Bayes on PCA components", cost=_nb_cost),
    "knn": ClassifierSpec(
        name="knn", build=_knn, grid={"clf__n_neighbors": [10, 20]},
        full_grid={"clf__n_neighbors": [3, 5, 10, 20, 40]},
        description="k nearest neighbours (faiss), cosine distance, distance-weighted; IVF index above "
                    f"{EXACT_KNN_MAX_ROWS:,} training rows", cost=_knn_cost, note=_knn_note),
    "rf": ClassifierSpec(
        name="rf", build=_rf, grid={"clf__min_samples_leaf": [1]}, full_grid={"clf__min_samples_leaf": [1, 2, 5]},
        description="random forest, 100 trees on 64 PCA components", cost=_rf_cost, note=_rf_note),
    "mlp": ClassifierSpec(
        name="mlp", build=_mlp, grid={"clf__alpha": [1e-2]}, full_grid={"clf__alpha": [1e-3, 1e-2, 1e-1]},
        description="one hidden layer of 256 (MLPClassifier, early stopping)", cost=_mlp_cost, note=_mlp_note),
}

# What compare and run fit when no --clf is given (``--all``: every entry, each with its full grid).
# Chosen by CV and time on the training rows (docs/fit.md, "The default classifiers").
DEFAULT_CLASSIFIERS = ("svm-rbf", "logreg", "knn")


def get_classifier(name):
    """The spec for a registry name, ``package.module:ClassName``, or an estimator instance."""
    if not isinstance(name, str):
        return _custom_spec(type(name).__name__, name)
    if name in CLASSIFIERS:
        return CLASSIFIERS[name]
    if ":" in name:
        return _custom_spec(name, _import_estimator(name))
    raise UsageError(f"unknown classifier '{name}'; known: {', '.join(CLASSIFIERS)}, "
                     "or package.module:ClassName")


def _import_estimator(name):
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot import classifier '{name}' ({err})") from None
    try:
        estimator = cls()
    except Exception as err:
        raise UsageError(f"cannot build classifier '{name}' with no arguments ({err})") from None
    if not (hasattr(estimator, "fit") and hasattr(estimator, "get_params")):
        raise UsageError(f"'{name}' is not a scikit-learn estimator (needs fit and get_params)")
    return estimator


def _custom_spec(name, estimator):
    from sklearn.base import clone

    def build(n_samples, n_features, seed):
        return [("scale", _scaler()), ("clf", clone(estimator))]

    return ClassifierSpec(name=name, build=build, grid={},
                          description=f"{type(estimator).__name__} after standardisation")


def fit_grid(grid, *, n_samples, n_features):
    """``grid`` with PCA sizes and k of k-NN capped by the data (``n_samples`` rows per CV fit),
    duplicates dropped."""
    caps = {"n_components": max(1, min(n_features, n_samples - 1)), "n_neighbors": max(1, n_samples)}
    out = {}
    for key, values in grid.items():
        cap = caps.get(key.rpartition("__")[2])
        if cap is not None:
            values = dict.fromkeys(min(v, cap) if isinstance(v, int) else v for v in values)
        out[key] = list(values)
    return out


def needs_calibration(pipeline):
    """True when the pipeline's final estimator has no ``predict_proba``."""
    return not hasattr(pipeline, "predict_proba")


def calibrated(pipeline, *, cv, seed=0, n_jobs=None):
    """Wrap an unfitted pipeline so that it gives probabilities (sigmoid calibration).

    With ``ensemble=False`` the pipeline is refitted on all rows and the calibrators are fitted
    on its cross-validated decision values.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    return CalibratedClassifierCV(pipeline, method="sigmoid", cv=folds, ensemble=False, n_jobs=n_jobs)


# --------------------------------------------------------------------------- grids


def parse_grid(items):
    """Parse ``["C=0.1,1,10", "pca__n_components=32,64"]`` into a parameter grid.

    A key without ``__`` is a parameter of the ``clf`` step. Values are Python literals
    (numbers, None, True, tuples) or plain strings.

    Returns
    -------
    dict of str to list
    """
    grid = {}
    for item in items or []:
        for part in _split_top(item, ";"):
            key, sep, values = part.partition("=")
            key = key.strip()
            if not sep or not key or not values.strip():
                raise UsageError(f"bad --grid '{part}'; use NAME=V1,V2 (e.g. C=0.1,1,10)")
            key = key if "__" in key else f"clf__{key}"
            grid[key] = [_literal(v) for v in _split_top(values, ",")]
    return grid


def _split_top(text, sep):
    """Split at ``sep`` outside brackets: ``"(1,2),3"`` -> ``["(1,2)", "3"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def format_params(params):
    """``{"clf__C": 0.1, "pca__n_components": 64}`` -> ``"C=0.1, pca__n_components=64"``."""
    return ", ".join(f"{k[len('clf__'):] if k.startswith('clf__') else k}={v!r}"
                     for k, v in sorted(params.items()))
