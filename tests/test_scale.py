"""Size-aware classifiers, planned memory and killed workers (issue 27), on tiny data: the
thresholds are lowered through the environment instead of building big matrices."""

import os
import re

import numpy as np
import pytest

from featurepipe import compare as comparemod
from featurepipe import fit as fitmod
from featurepipe.budget import parse_bytes
from featurepipe.classifiers import CLASSIFIERS, FaissKNN, RBFKernel, ScaledNystroem
from featurepipe.cli import run_main
from featurepipe.errors import UsageError
from featurepipe.fit import fit, load_feature_set

from featurefiles import separable, two_files, write_features
from oom_estimator import SelfKillingClassifier


@pytest.fixture
def synth(tmp_path):
    X, y, paths, split = separable(n_per_class=30)
    return write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)


def test_svm_rbf_is_exact_below_the_threshold_and_nystroem_above(monkeypatch, synth):
    monkeypatch.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "1000")
    exact = fit([synth], "svm-rbf", cv=3, n_jobs=1, save=False)
    monkeypatch.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "20")
    bounded = fit([synth], "svm-rbf", cv=3, n_jobs=1, save=False)
    assert "nystroem" not in exact.best_params
    assert re.search(r"nystroem \d+", bounded.best_params), bounded.best_params
    assert bounded.status == "ok" and bounded.cv_mean >= 0.9 and bounded.test_accuracy >= 0.9
    small = CLASSIFIERS["svm-rbf"].make(n_samples=20, n_features=12)
    big = CLASSIFIERS["svm-rbf"].make(n_samples=21, n_features=12)
    assert isinstance(small.named_steps["kernel"], RBFKernel)
    assert isinstance(big.named_steps["kernel"], ScaledNystroem)


def test_nystroem_uses_the_exact_kernels_gamma():
    X, _, _, _ = separable(n_per_class=20)
    X = fitmod.l2_normalize(X)
    ny = ScaledNystroem(n_components=len(X)).fit(X)
    assert ny.gamma_ == pytest.approx(RBFKernel().fit(X).gamma_)
    phi = ny.transform(X)
    assert phi.dtype == np.float32
    np.testing.assert_allclose(phi @ phi.T, RBFKernel().fit(X).transform(X), atol=1e-3)


def test_grid_search_runs_on_a_stratified_subsample_above_the_threshold(monkeypatch, synth):
    monkeypatch.setenv("FEATUREPIPE_SEARCH_MAX_ROWS", "45")
    seen, refit_rows = [], []
    from sklearn import model_selection

    class Recording(model_selection.GridSearchCV):
        def fit(self, X, y, **kw):
            seen.append(np.bincount(y))
            return super().fit(X, y, **kw)

    monkeypatch.setattr(model_selection, "GridSearchCV", Recording)
    real_search = fitmod.search
    monkeypatch.setattr(fitmod, "search", lambda **kw: refit_rows.append(len(kw["y"])) or real_search(**kw))
    result = fit([synth], "logreg", cv=3, n_jobs=1, save=False)
    assert [c.sum() for c in seen] == [45] and list(seen[0]) == [15, 15, 15]  # in proportion
    assert result.best_params.count("chosen by CV on a 45-row subsample") == 1
    assert refit_rows == [66] and result.n_train == 66 and result.status == "ok"  # refit on all


def test_faiss_knn_equals_scikit_learn_brute_force():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(300, 16))).astype(np.float32)
    y = rng.integers(0, 4, 300)
    for k in (1, 5, 10):
        ours = FaissKNN(n_neighbors=k).fit(X[:200], y[:200])
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance",
                                   algorithm="brute").fit(X[:200], y[:200])
        assert np.array_equal(ours.predict(X[200:]), ref.predict(X[200:]))
        np.testing.assert_allclose(ours.predict_proba(X[200:]), ref.predict_proba(X[200:]), atol=1e-4)


def test_faiss_knn_switches_to_ivf_above_its_threshold_and_pickles():
    import pickle

    X, y, _, _ = separable(n_per_class=100, dim=16)
    exact = FaissKNN(n_neighbors=5).fit(X, y)
    ivf = FaissKNN(n_neighbors=5, exact_max_rows=50, nprobe=64).fit(X, y)
    assert type(exact.index_).__name__ == "IndexFlatIP" and "IVF" in type(ivf.index_).__name__
    back = pickle.loads(pickle.dumps(ivf))
    assert np.array_equal(back.predict(X), ivf.predict(X))
    assert (ivf.predict(X) == exact.predict(X)).mean() >= 0.95


def test_a_compare_that_cannot_fit_refuses_in_one_line_before_any_fit(monkeypatch, tmp_path, capsys):
    a, b = two_files(tmp_path / "feats")
    calls = []
    monkeypatch.setattr(fitmod, "search", lambda **kw: calls.append(kw))
    monkeypatch.setenv("FEATUREPIPE_MEMORY", "1K")
    code = run_main(comparemod.main, ["--features", str(a), str(b), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--clf" in err and "nothing was fitted" in err
    assert calls == []  # refused before the first row
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*.joblib"))


def test_fit_refuses_a_row_that_cannot_fit(monkeypatch, synth):
    monkeypatch.setenv("FEATUREPIPE_MEMORY", "1K")
    with pytest.raises(UsageError, match="svm-rbf needs ~.* available"):
        fit([synth], "svm-rbf", cv=3, n_jobs=1, save=False)


def test_a_worker_killed_for_memory_fails_its_row_in_one_line_and_compare_goes_on(tmp_path, capsys):
    X, y, paths, split = separable(n_per_class=30)
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    rows = comparemod.compare([f], [SelfKillingClassifier(parent_pid=os.getpid()), "logreg"], cv=3,
                              n_jobs=2, plots=False, report=False)
    by_clf = {r["clf"]: r for r in rows}
    killed = by_clf["SelfKillingClassifier"]
    assert killed["status"].startswith("failed: a worker process was killed (out of memory?)")
    assert by_clf["logreg"]["status"] == "ok"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TerminatedWorkerError" not in err
    assert "alpha / SelfKillingClassifier: failed: a worker process was killed" in err


def test_a_killed_fit_child_becomes_a_failed_row(tmp_path):
    X, y, paths, split = separable(n_per_class=30)
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    result = fit([f], SelfKillingClassifier(parent_pid=os.getpid()), cv=3, n_jobs=1, max_seconds=120,
                 save=False)
    assert result.status.startswith("failed: the fit's child process was killed (out of memory?)")


def test_joined_features_are_read_into_one_float32_matrix(tmp_path):
    a, b = two_files(tmp_path / "feats")
    fs = load_feature_set([a, b])
    assert fs.X.dtype == np.float32 and fs.X.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(fs.X[:, :12], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fs.X[:, 12:], axis=1), 1, rtol=1e-5)
    alone = load_feature_set([b])  # b is stored in reversed order: rows are aligned by path
    assert list(alone.paths) == list(fs.paths)
    np.testing.assert_array_equal(alone.X, fs.X[:, 12:])


def test_every_registry_classifier_has_a_cost_that_grows_with_the_rows():
    for spec in CLASSIFIERS.values():
        small = spec.cost_for(n_samples=1_000, n_features=512, n_classes=10)
        big = spec.cost_for(n_samples=100_000, n_features=512, n_classes=10)
        assert 0 < small.memory < big.memory and 0 < small.seconds < big.seconds, spec.name


def test_memory_sizes_parse_and_bad_ones_are_one_line():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("100") == 100
    with pytest.raises(UsageError, match="FEATUREPIPE_MEMORY"):
        parse_bytes("lots")


def test_a_refusal_names_every_row_that_cannot_fit_and_the_classifiers_that_can():
    from featurepipe.budget import GB, RowPlan, check_plans

    def plan(clf, gb, note=""):
        return RowPlan("big", clf, 800_000, 1280, 100, 20_000, gb * GB, 60.0, note, gb * GB)

    plans = [plan("svm-rbf", 23.7, "nystroem 2048"), plan("logreg", 10.4), plan("knn", 8.6), plan("mlp", 30.0)]
    with pytest.raises(UsageError) as refused:
        check_plans(plans, available=16 * GB)
    line = str(refused.value)
    assert "\n" not in line
    assert "big / svm-rbf needs ~23.7 GB" in line and "big / mlp needs ~30.0 GB" in line
    assert "logreg needs" not in line and "knn needs" not in line
    assert "use --clf logreg knn" in line and "nothing was fitted" in line
    check_plans(plans[1:3], available=16 * GB)  # the named alternative does fit: no refusal


def test_the_blockwise_scaler_equals_standard_scaler_and_fits_a_block_at_a_time(monkeypatch):
    from sklearn.preprocessing import StandardScaler

    from featurepipe import estimators
    from featurepipe.estimators import BlockwiseStandardScaler

    X = np.random.default_rng(0).normal(3.0, 2.0, (1000, 24)).astype(np.float32)
    reference = StandardScaler().fit(X)
    whole = BlockwiseStandardScaler().fit(X)  # one block: the same computation
    assert np.array_equal(whole.mean_, reference.mean_) and np.array_equal(whole.scale_, reference.scale_)
    monkeypatch.setattr(estimators, "BLOCK_ROWS", 64)
    seen = []
    real = StandardScaler.partial_fit
    monkeypatch.setattr(StandardScaler, "partial_fit", lambda self, X, *a, **k: seen.append(len(X)) or real(self, X, *a, **k))
    blocks = BlockwiseStandardScaler().fit(X)
    assert max(seen) == 64 and sum(seen) == 1000 and blocks.n_samples_seen_ == 1000
    np.testing.assert_allclose(blocks.mean_, reference.mean_, rtol=1e-6)
    np.testing.assert_allclose(blocks.scale_, reference.scale_, rtol=1e-5)
    np.testing.assert_allclose(blocks.transform(X), reference.transform(X), atol=1e-5)


def test_faiss_knn_above_its_threshold_keeps_8_bit_codes_and_adds_in_blocks(monkeypatch):
    from featurepipe import estimators

    monkeypatch.setattr(estimators, "BLOCK_ROWS", 50)
    X, y, _, _ = separable(n_per_class=100, dim=16)
    exact = FaissKNN(n_neighbors=5).fit(X, y)
    approx = FaissKNN(n_neighbors=5, exact_max_rows=50, nprobe=64).fit(X, y)
    assert "ScalarQuantizer" in type(approx.index_).__name__ and approx.index_.ntotal == len(X)
    assert approx.index_.code_size == X.shape[1]  # one byte per feature
    assert (approx.predict(X) == exact.predict(X)).mean() >= 0.95


def test_faiss_knn_takes_lists_and_few_rows_above_its_threshold():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 4)).tolist()
    y = [0, 1] * 6
    knn = FaissKNN(n_neighbors=3, exact_max_rows=5).fit(X, y)
    assert knn.index_.ntotal == 12 and knn.index_.nlist == 1  # at least 39 rows per list
    assert knn.predict(X).shape == (12,) and np.allclose(knn.predict_proba(X).sum(axis=1), 1.0)
