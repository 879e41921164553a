"""Scikit-learn estimators featurepipe adds for data at scale (``featurepipe.classifiers`` builds
them into its pipelines): ``ScaledNystroem``, an RBF kernel map with the exact kernel's gamma
rule, ``FaissKNN``, cosine k-NN through faiss (exact, or an IVF index for many rows), and
``BlockwiseStandardScaler``, a ``StandardScaler`` whose fit needs no float64 copy of the rows.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

BLOCK_ROWS = 16_384  # rows normalised (or fitted) at a time: a block's copy, never the whole matrix's


def scale_gamma(X):
    """The ``"scale"`` gamma of ``SVC``: ``1 / (n_features * X.var())`` (1 for constant X)."""
    variance = float(np.asarray(X, dtype=np.float32).var())
    return 1.0 / (X.shape[1] * variance) if variance > 0 else 1.0


class ScaledNystroem(TransformerMixin, BaseEstimator):
    """A Nystroem map of the RBF kernel with the exact kernel's gamma rule (``scale_gamma``); float32 output.

    ``phi(x) . phi(x')`` approximates ``exp(-gamma * |x - x'|^2)`` from ``n_components`` training
    rows, so a linear model on ``phi`` approximates the kernel machine, in memory linear in the
    rows (scikit-learn: SVC is "impractical beyond tens of thousands of samples").

    Parameters
    ----------
    n_components : int, default=2048
    gamma : float or "scale", default="scale"
    random_state : int, default=0
    """

    def __init__(self, *, n_components=2048, gamma="scale", random_state=0):
        self.n_components = n_components
        self.gamma = gamma
        self.random_state = random_state

    def fit(self, X, y=None):
        """Fit the map on ``X`` of shape (n_samples, n_features); returns self."""
        from sklearn.kernel_approximation import Nystroem

        X = np.asarray(X, dtype=np.float32)
        gamma = scale_gamma(X[:20_000]) if self.gamma == "scale" else float(self.gamma)
        self.gamma_ = gamma
        self.nystroem_ = Nystroem(kernel="rbf", gamma=gamma, n_components=min(self.n_components, len(X)),
                                  random_state=self.random_state).fit(X)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """The map of shape (n_rows, n_components), float32; in blocks of 20,000 rows."""
        check_is_fitted(self, "nystroem_")
        X = np.asarray(X, dtype=np.float32)
        out = np.empty((len(X), self.nystroem_.components_.shape[0]), dtype=np.float32)
        for start in range(0, len(X), 20_000):
            out[start:start + 20_000] = self.nystroem_.transform(X[start:start + 20_000])
        return out


def ivf_lists(n_rows):
    """Inverted lists of ``FaissKNN``'s IVF index for ``n_rows`` rows: 4 sqrt(n), at least 39 rows each."""
    return max(1, min(int(4 * np.sqrt(n_rows)), n_rows // 39))


class FaissKNN(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity through faiss, distance-weighted like
    ``KNeighborsClassifier(metric="cosine", weights="distance")``.

    Rows are L2-normalised and searched by inner product: exactly (``IndexFlatIP``) up to
    ``exact_max_rows`` training rows, above that in an ``IndexIVFScalarQuantizer`` of
    ``4 sqrt(n)`` lists probed ``nprobe`` at a time, each row stored in 8 bits per feature (faiss:
    exact search is practical to about a million vectors, IVF with compressed codes beyond). The
    fitted model keeps the training rows inside the index: n x d x 4 bytes exact, n x d above.

    Parameters
    ----------
    n_neighbors : int, default=10
    weights : {"distance", "uniform"}, default="distance"
    exact_max_rows : int, default=50_000
        (None: 50,000.) The registry passes ``featurepipe.classifiers.exact_knn_max_rows()``.
    nprobe : int, default=32
    random_state : int, default=0
    """

    def __init__(self, *, n_neighbors=10, weights="distance", exact_max_rows=50_000, nprobe=32, random_state=0):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.exact_max_rows = exact_max_rows
        self.nprobe = nprobe
        self.random_state = random_state

    def fit(self, X, y):
        """Index ``X`` of shape (n_samples, n_features) with labels ``y``; returns self."""
        import faiss

        if self.weights not in ("distance", "uniform"):
            raise ValueError(f"weights must be 'distance' or 'uniform', got {self.weights!r}")
        X = np.asarray(X)  # no copy for an array; rows are normalised (copied) a block at a time
        self.classes_, self.y_ = np.unique(np.asarray(y), return_inverse=True)
        n, d = X.shape
        self.n_features_in_ = d
        if n <= (50_000 if self.exact_max_rows is None else self.exact_max_rows):
            index = faiss.IndexFlatIP(d)
        else:
            nlist = ivf_lists(n)
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(self.random_state).choice(n, min(n, 64 * nlist), replace=False)
            index.train(_unit_rows(X[np.sort(sample)], copy=False))  # the sample is a copy already
            index.nprobe = self.nprobe
        for start in range(0, n, BLOCK_ROWS):  # normalised block by block: no full-size copy
            index.add(_unit_rows(X[start:start + BLOCK_ROWS]))
        self.index_ = index
        return self

    def __getstate__(self):  # faiss indexes are not picklable as they are: store their bytes
        state = dict(self.__dict__)
        if "index_" in state:
            import faiss

            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("index_"), np.ndarray):
            import faiss

            state["index_"] = faiss.deserialize_index(state["index_"])
        self.__dict__.update(state)

    def predict_proba(self, X):
        """Class probabilities of shape (n_rows, n_classes): neighbour weights, normalised."""
        import faiss

        check_is_fitted(self, "index_")
        k = min(int(self.n_neighbors), self.index_.ntotal)
        out = np.zeros((len(X), len(self.classes_)), dtype=np.float64)
        for start in range(0, len(X), 4096):
            sims, idx = self.index_.search(_unit_rows(X[start:start + 4096]), k)
            # 8-bit codes can put a near copy's similarity above 1: only the exact index has exact matches
            floor = 0.0 if isinstance(self.index_, faiss.IndexFlat) else 1e-6
            dist = np.maximum(1.0 - sims.astype(np.float64), floor)
            valid = idx >= 0
            if self.weights == "uniform":
                w = valid.astype(np.float64)
            else:  # as scikit-learn: 1 / distance, and only the exact matches when there are any
                with np.errstate(divide="ignore"):
                    w = 1.0 / dist
                exact = np.isinf(w)
                w = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), w) * valid
            labels = self.y_[np.where(valid, idx, 0)]
            block = out[start:start + 4096]
            np.add.at(block, (np.arange(len(labels))[:, None], labels), w)
        total = out.sum(axis=1, keepdims=True)
        return np.divide(out, total, out=np.full_like(out, 1.0 / len(self.classes_)), where=total > 0)

    def predict(self, X):
        """Labels of shape (n_rows,)."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def _unit_rows(X, copy=True):
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if copy:
        return X / norms
    X /= norms
    return X


class BlockwiseStandardScaler(StandardScaler):
    """``StandardScaler`` fitted ``BLOCK_ROWS`` rows at a time (``partial_fit``).

    scikit-learn's one-shot fit subtracts the float64 mean from every row at once, a float64 copy
    of a float32 matrix (twice its size: 6 GB for 800,000 x 1,280); here the copy is one block's.
    ``mean_``, ``var_`` and ``scale_`` are those of ``StandardScaler`` (identical up to
    ``BLOCK_ROWS`` rows, equal to float rounding above); the transform is ``StandardScaler``'s.
    """

    def fit(self, X, y=None, sample_weight=None):
        """Fit on ``X`` of shape (n_samples, n_features); returns self."""
        if hasattr(X, "tocsr"):
            X = X.tocsr()  # a sparse matrix that cannot be sliced by rows (COO)
        n = X.shape[0] if hasattr(X, "shape") else len(X)
        if n <= BLOCK_ROWS:
            return super().fit(X, y, sample_weight=sample_weight)
        self._reset()
        for start in range(0, n, BLOCK_ROWS):
            weights = None if sample_weight is None else sample_weight[start:start + BLOCK_ROWS]
            self.partial_fit(X[start:start + BLOCK_ROWS], sample_weight=weights)
        return self
