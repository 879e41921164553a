"""Fitted scikit-learn classifiers as graph functions, for ``featurepipe.export``.

``head_function(estimator)`` turns a fitted model (what ``featurepipe.fit`` saves: a ``Pipeline``
of ``scale``, optional ``pca`` or ``kernel``, ``clf``; or that pipeline inside a sigmoid
``CalibratedClassifierCV``) into ``(fn, output)``: ``fn`` maps a float32 tensor (n, D) of joined,
L2-normalised features to (n, n_classes) float32 in the order of ``estimator.classes_``, built
from ``keras.ops`` only (so it converts to LiteRT builtins and saves as a SavedModel); ``output``
is ``"probabilities"`` (``predict_proba``) or ``"scores"`` (``decision_function``).

Each estimator type is one registry entry:

* ``TRANSFORMS``: type -> ``build(estimator, keep_rows) -> fn`` for pipeline steps before the head;
* ``HEADS``: type -> ``HeadKind`` with ``proba`` and/or ``decision`` builders;
* ``WRAPPERS``: ``Pipeline`` and ``CalibratedClassifierCV``, which compose the two.

A new classifier (a kernel approximation, another nearest-neighbour index) is one entry. Anything
without one is refused with ``NotExportable``. Every entry is tested against the estimator's own
``predict_proba`` / ``decision_function`` (tests/test_export.py).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from .classifiers import RBFKernel
from .estimators import BlockwiseStandardScaler, FaissKNN, ScaledNystroem


class NotExportable(Exception):
    """The estimator (named in the message) has no graph builder."""


@dataclass(frozen=True)
class HeadKind:
    """The graph builders of one classifier type: ``build(estimator, ctx) -> fn``.

    ``proba`` gives ``predict_proba``, ``decision`` gives ``decision_function``; either may be None.
    """

    proba: Optional[Callable] = None
    decision: Optional[Callable] = None


def _ops():
    import keras

    return keras.ops


def _f32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))


# --------------------------------------------------------------------------- transforms


def _standard_scaler(est, ctx):
    ops = _ops()
    mean = _f32(est.mean_ if est.with_mean and est.mean_ is not None else np.zeros(est.n_features_in_))
    scale = _f32(est.scale_ if est.with_std and est.scale_ is not None else np.ones(est.n_features_in_))
    return lambda x: ops.divide(ops.subtract(x, mean), scale)


def _pca(est, ctx):
    ops = _ops()
    mean, components = _f32(est.mean_), _f32(est.components_.T)
    scale = _f32(np.sqrt(est.explained_variance_)) if est.whiten else None

    def fn(x):
        out = ops.matmul(ops.subtract(x, mean), components)
        return out if scale is None else ops.divide(out, scale)

    return fn


def _sq_dist(x, rows):
    """|x - r|^2 of shape (n, m) for x (n, d) and constant rows (m, d), clipped at 0 (as RBFKernel)."""
    ops = _ops()
    sq_rows = _f32(np.einsum("ij,ij->i", rows, rows))
    d = ops.add(ops.sum(ops.square(x), axis=1, keepdims=True), sq_rows[None, :])
    d = ops.subtract(d, ops.multiply(2.0, ops.matmul(x, _f32(rows.T))))
    return ops.maximum(d, 0.0)


def _rbf_kernel(est, ctx):
    """featurepipe's RBFKernel: the kernel against the training rows (only the support vectors'
    rows when the next step is a precomputed-kernel SVC: ``ctx["keep_rows"]``)."""
    ops = _ops()
    rows = np.asarray(est.X_fit_, dtype=np.float32)
    keep = ctx.get("keep_rows")
    rows = rows[keep] if keep is not None else rows
    gamma = float(est.gamma_)
    return lambda x: ops.exp(ops.multiply(-gamma, _sq_dist(x, rows)))


def _nystroem(est, ctx):
    """sklearn's Nystroem (rbf kernel): kernel against its components, times ``normalization_.T``."""
    ops = _ops()
    if est.kernel != "rbf":
        raise NotExportable(f"Nystroem with kernel={est.kernel!r} (only 'rbf' is exported)")
    gamma = float(est.gamma) if est.gamma is not None else 1.0 / est.components_.shape[1]
    rows, norm = np.asarray(est.components_, np.float32), _f32(est.normalization_.T)
    return lambda x: ops.matmul(ops.exp(ops.multiply(-gamma, _sq_dist(x, rows))), norm)


def _scaled_nystroem(est, ctx):
    """featurepipe's ScaledNystroem: its fitted Nystroem (``nystroem_``), float32 in and out."""
    return _nystroem(est.nystroem_, ctx)


# --------------------------------------------------------------------------- heads


def _binary_to_two(p):
    """(n,) probability of classes_[1] -> (n, 2)."""
    ops = _ops()
    return ops.stack([ops.subtract(1.0, p), p], axis=1)


def _linear_decision(est, ctx):
    """``X @ coef_.T + intercept_``: (n, C), or (n,) for two classes (sklearn's shape; a binary
    RidgeClassifier's ``coef_`` is (d,), the others' (1, d))."""
    ops = _ops()
    weights = np.atleast_2d(est.coef_)
    coef, intercept = _f32(weights.T), _f32(np.ravel(est.intercept_) * np.ones(weights.shape[0]))
    if coef.shape[1] == 1:
        return lambda x: ops.add(ops.matmul(x, coef)[:, 0], intercept[0])
    return lambda x: ops.add(ops.matmul(x, coef), intercept)


def _logreg_proba(est, ctx):
    ops = _ops()
    decision = _linear_decision(est, ctx)
    if len(est.classes_) <= 2:
        return lambda x: _binary_to_two(ops.sigmoid(decision(x)))
    return lambda x: ops.softmax(decision(x), axis=-1)


def _svc_decision(est, ctx):
    """libsvm's one-vs-one decision (kernel against the support vectors), then sklearn's
    ``decision_function_shape="ovr"`` votes + confidences for more than two classes."""
    ops = _ops()
    if est.kernel == "precomputed":
        kernel = ctx.get("kernel_of_support")
        if kernel is None:
            raise NotExportable("SVC(kernel='precomputed') without the RBFKernel step before it")
    elif est.kernel == "rbf":
        rows, gamma = np.asarray(est.support_vectors_, np.float32), float(est._gamma)
        kernel = lambda x: ops.exp(ops.multiply(-gamma, _sq_dist(x, rows)))  # noqa: E731
    else:
        raise NotExportable(f"SVC(kernel={est.kernel!r}) (rbf and precomputed RBF are exported)")
    dual, intercept = np.asarray(est.dual_coef_, np.float64), np.asarray(est.intercept_, np.float64)
    n_classes = len(est.classes_)
    if n_classes == 2:
        w = _f32(dual[0][:, None])
        return lambda x: ops.add(ops.matmul(kernel(x), w)[:, 0], float(intercept[0]))
    w, first, second = _ovo_weights(dual, est.n_support_, n_classes)
    b = _f32(intercept)

    def fn(x):
        dec = ops.add(ops.matmul(kernel(x), w), b)  # (n, pairs), > 0 favours the pair's first class
        votes = ops.add(ops.matmul(ops.cast(ops.greater_equal(dec, 0.0), "float32"), first),
                        ops.matmul(ops.cast(ops.less(dec, 0.0), "float32"), second))
        conf = ops.matmul(dec, ops.subtract(first, second))
        return ops.add(votes, ops.divide(conf, ops.multiply(3.0, ops.add(ops.abs(conf), 1.0))))

    return fn


def _ovo_weights(dual, n_support, n_classes):
    """Per class pair (i < j): the support vectors' weights (n_SV, pairs) and the one-hot maps
    pair -> i and pair -> j (pairs, C), as libsvm and ``sklearn.svm._base`` order them."""
    starts = np.concatenate([[0], np.cumsum(n_support)])
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    w = np.zeros((dual.shape[1], len(pairs)))
    first, second = np.zeros((len(pairs), n_classes)), np.zeros((len(pairs), n_classes))
    for p, (i, j) in enumerate(pairs):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        w[si, p], w[sj, p] = dual[j - 1, si], dual[i, sj]
        first[p, i] = second[p, j] = 1.0
    return _f32(w), _f32(first), _f32(second)


_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": None}


def _mlp_proba(est, ctx):
    ops = _ops()
    layers = [(_f32(w), _f32(b)) for w, b in zip(est.coefs_, est.intercepts_)]
    hidden = _ACTIVATIONS[est.activation]

    def fn(x):
        for k, (w, b) in enumerate(layers):
            x = ops.add(ops.matmul(x, w), b)
            if k < len(layers) - 1 and hidden:
                x = getattr(ops, hidden)(x)
        if est.out_activation_ == "softmax":
            return ops.softmax(x, axis=-1)
        return _binary_to_two(ops.sigmoid(x)[:, 0])

    return fn


def _nb_proba(est, ctx):
    """GaussianNB: per class log prior - 0.5 sum log(2 pi var) - 0.5 sum (x - theta)^2 / var,
    normalised with a log-sum-exp."""
    ops = _ops()
    theta, var = _f32(est.theta_), np.asarray(est.var_, np.float64)
    inv_var = _f32(1.0 / var)
    const = _f32(np.log(est.class_prior_) - 0.5 * np.sum(np.log(2.0 * np.pi * var), axis=1))

    def fn(x):
        diff = ops.subtract(ops.expand_dims(x, 1), theta[None])  # (n, C, d)
        jll = ops.subtract(const, ops.multiply(0.5, ops.sum(ops.multiply(ops.square(diff), inv_var), axis=2)))
        return ops.exp(ops.subtract(jll, ops.logsumexp(jll, axis=1, keepdims=True)))

    return fn


def _knn_proba(est, ctx):
    """k nearest stored rows (cosine or euclidean), uniform or inverse-distance weights."""
    ops = _ops()
    if est.metric not in ("cosine", "euclidean") or est.weights not in ("uniform", "distance") \
            or (est.metric == "euclidean" and est.p not in (2, None)):
        raise NotExportable(f"KNeighborsClassifier(metric={est.metric!r}, weights={est.weights!r}) "
                            "(cosine or euclidean, uniform or distance weights are exported)")
    rows, k = np.asarray(est._fit_X, np.float32), int(est.n_neighbors)
    onehot = _f32(np.eye(len(est.classes_))[np.asarray(est._y).ravel()])  # (m, C)
    if est.metric == "cosine":
        unit = _f32(rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30))

    def distances(x):
        if est.metric == "euclidean":
            return ops.sqrt(_sq_dist(x, rows))
        xn = ops.divide(x, ops.maximum(ops.norm(x, axis=1, keepdims=True), 1e-30))
        return ops.clip(ops.subtract(1.0, ops.matmul(xn, unit.T)), 0.0, 2.0)

    def fn(x):
        neg, idx = ops.top_k(ops.negative(distances(x)), k=k)
        return _neighbour_vote(ops.negative(neg), idx, onehot, est.weights)

    return fn


def _neighbour_vote(dist, idx, onehot, weights):
    """Class probabilities (n, C) from the k nearest rows' distances and indices (n, k):
    ``uniform`` or ``distance`` (1 / distance; only the exact matches when a row has any), as
    scikit-learn's KNeighborsClassifier weighs them; ``onehot`` (m, C) holds the stored labels."""
    ops = _ops()
    if weights == "uniform":
        w = ops.ones_like(dist)
    else:
        zero = ops.cast(ops.less_equal(dist, 0.0), "float32")
        any_zero = ops.max(zero, axis=1, keepdims=True)
        w = ops.add(ops.multiply(any_zero, zero),
                    ops.multiply(ops.subtract(1.0, any_zero), ops.divide(1.0, ops.maximum(dist, 1e-30))))
    votes = ops.sum(ops.multiply(ops.take(onehot, idx, axis=0), ops.expand_dims(w, 2)), axis=1)
    total = ops.sum(votes, axis=1, keepdims=True)
    return ops.divide(votes, ops.where(ops.equal(total, 0.0), 1.0, total))


def _faiss_knn_proba(est, ctx):
    """featurepipe's FaissKNN: cosine similarity against the unit rows stored in its exact
    (``IndexFlatIP``) index, distance ``1 - similarity``, weighted as ``FaissKNN.predict_proba``."""
    import faiss

    ops = _ops()
    index = faiss.downcast_index(est.index_)
    if not isinstance(index, faiss.IndexFlat):
        raise NotExportable(f"FaissKNN over a {type(index).__name__} of {index.ntotal:,} rows (an approximate "
                            "search the graph cannot reproduce; only the exact IndexFlatIP is exported)")
    if est.weights not in ("uniform", "distance"):
        raise NotExportable(f"FaissKNN(weights={est.weights!r}) (uniform or distance weights are exported)")
    unit_t = _f32(index.reconstruct_n(0, index.ntotal).T)  # (d, m): the unit training rows
    k = min(int(est.n_neighbors), index.ntotal)
    onehot = _f32(np.eye(len(est.classes_))[np.asarray(est.y_).ravel()])  # (m, C)

    def fn(x):
        xn = ops.divide(x, ops.maximum(ops.norm(x, axis=1, keepdims=True), 1e-12))
        sims, idx = ops.top_k(ops.matmul(xn, unit_t), k=k)
        return _neighbour_vote(ops.maximum(ops.subtract(1.0, sims), 0.0), idx, onehot, est.weights)

    return fn


# --------------------------------------------------------------------------- wrappers


def _pipeline(est, response, ctx):
    steps = [s for _, s in est.steps if s is not None and s != "passthrough"]
    *transforms, last = steps
    fns = []
    for k, step in enumerate(transforms):
        nxt = steps[k + 1]
        step_ctx = {"keep_rows": nxt.support_} if _kernel_then_svc(step, nxt) else {}
        fns.append(_lookup(TRANSFORMS, step, "transform")(step, step_ctx))
    head_ctx = {}
    if transforms and _kernel_then_svc(transforms[-1], last):
        head_ctx["kernel_of_support"] = fns.pop()
    head = _build(last, response, head_ctx)

    def fn(x):
        for f in fns:
            x = f(x)
        return head(x)

    return fn


def _kernel_then_svc(step, nxt):
    return isinstance(step, RBFKernel) and isinstance(nxt, SVC) and nxt.kernel == "precomputed"


def _calibrated(est, response, ctx):
    """CalibratedClassifierCV(method="sigmoid", ensemble=False): the inner decision, then
    ``1 / (1 + exp(a f + b))`` per class, normalised (two classes: [1 - p, p])."""
    ops = _ops()
    if response != "proba":
        raise NotExportable("CalibratedClassifierCV has no decision_function")
    if len(est.calibrated_classifiers_) != 1 or est.method != "sigmoid":
        raise NotExportable("CalibratedClassifierCV other than sigmoid with ensemble=False")
    cal = est.calibrated_classifiers_[0]
    inner = _build(cal.estimator, "decision", ctx)
    a = _f32([c.a_ for c in cal.calibrators])
    b = _f32([c.b_ for c in cal.calibrators])
    n_classes = len(est.classes_)
    if list(cal.estimator.classes_) != list(est.classes_):
        raise NotExportable("a calibrated model whose inner classes differ from its own")

    def fn(x):
        f = inner(x)
        if n_classes == 2:
            return _binary_to_two(ops.sigmoid(ops.negative(ops.add(ops.multiply(a[0], f), b[0]))))
        p = ops.sigmoid(ops.negative(ops.add(ops.multiply(a, f), b)))
        total = ops.sum(p, axis=1, keepdims=True)
        uniform = ops.multiply(ops.ones_like(p), 1.0 / n_classes)
        return ops.where(ops.equal(total, 0.0), uniform, ops.divide(p, ops.where(ops.equal(total, 0.0), 1.0, total)))

    return fn


HEADS = {
    LogisticRegression: HeadKind(proba=_logreg_proba, decision=_linear_decision),
    LinearSVC: HeadKind(decision=_linear_decision),
    RidgeClassifier: HeadKind(decision=_linear_decision),
    SVC: HeadKind(decision=_svc_decision),
    MLPClassifier: HeadKind(proba=_mlp_proba),
    GaussianNB: HeadKind(proba=_nb_proba),
    KNeighborsClassifier: HeadKind(proba=_knn_proba),
    FaissKNN: HeadKind(proba=_faiss_knn_proba),
}
TRANSFORMS = {StandardScaler: _standard_scaler, BlockwiseStandardScaler: _standard_scaler, PCA: _pca,
              RBFKernel: _rbf_kernel, Nystroem: _nystroem, ScaledNystroem: _scaled_nystroem}
WRAPPERS = {Pipeline: _pipeline, CalibratedClassifierCV: _calibrated}


def _lookup(registry, est, what):
    build = registry.get(type(est))
    if build is None:
        raise NotExportable(f"{type(est).__name__} (no graph for this {what})")
    return build


def _build(est, response, ctx):
    wrapper = WRAPPERS.get(type(est))
    if wrapper is not None:
        return wrapper(est, response, ctx)
    kind = _lookup(HEADS, est, "classifier")
    build = kind.proba if response == "proba" else kind.decision
    if build is None:
        raise NotExportable(f"{type(est).__name__} has no {'predict_proba' if response == 'proba' else 'decision_function'}")
    return build(est, ctx)


def head_function(estimator):
    """The graph function of a fitted model and what it outputs.

    Returns
    -------
    (fn, output) : fn maps a float32 tensor (n, D) to (n, n_classes) in ``estimator.classes_``
        order; ``output`` is ``"probabilities"`` or ``"scores"``.

    Raises NotExportable naming the first estimator that has no graph builder.
    """
    if hasattr(estimator, "predict_proba"):
        try:
            return _build(estimator, "proba", {}), "probabilities"
        except NotExportable:
            if not hasattr(estimator, "decision_function"):
                raise
    fn = _build(estimator, "decision", {})
    if len(estimator.classes_) == 2:  # (n,) score of classes_[1] -> (-s, s)
        ops = _ops()
        return (lambda x: ops.stack([ops.negative(fn(x)), fn(x)], axis=1)), "scores"
    return fn, "scores"
