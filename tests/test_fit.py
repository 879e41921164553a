import csv
import json
import sys
import time
import types
from contextlib import contextmanager

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from featurepipe.classifiers import CLASSIFIERS, fit_grid, get_classifier, parse_grid
from featurepipe.errors import DataError, UsageError
from featurepipe.modelfile import load_user
from featurepipe.fit import RESULT_COLUMNS, fit, l2_normalize, load_feature_set, main
from featurepipe.paths import latest_pointer

from featurefiles import CLASSES, separable, two_files, write_features


@pytest.fixture
def synth(tmp_path):
    X, y, paths, split = separable()
    return write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_each_classifier_learns_separable_features(name, synth):
    result = fit([synth], name, cv=3, n_jobs=1, save=False)
    assert result.status == "ok"
    assert result.test_accuracy >= 0.9 and result.cv_mean >= 0.9
    assert result.n_train == 36 and result.n_test == 12
    assert np.asarray(result.confusion).sum() == 12


def test_every_registry_pipeline_has_fixed_steps_and_a_valid_grid():
    for spec in CLASSIFIERS.values():
        pipe = spec.make(n_samples=100, n_features=20, seed=0)
        names = [n for n, _ in pipe.steps]
        assert names[0] == "scale" and names[-1] == "clf" and set(names) <= {"scale", "pca", "kernel", "clf"}
        for grid in (spec.grid_for(), spec.grid_for(full=True)):
            assert set(grid) <= set(pipe.get_params()), spec.name
            assert all(isinstance(v, list) and v for v in grid.values())
        assert all(set(v) <= set(spec.grid_for(full=True)[k]) for k, v in spec.grid.items()), spec.name


def test_the_precomputed_rbf_kernel_gives_libsvms_rbf_model():
    from sklearn.svm import SVC

    X, y, _, _ = separable(n_per_class=30, dim=16)
    X = l2_normalize(X)
    pipe = CLASSIFIERS["svm-rbf"].make(n_samples=len(X), n_features=X.shape[1]).fit(X[::2], y[::2])
    reference = SVC(kernel="rbf", C=pipe.named_steps["clf"].C, gamma="scale").fit(X[::2], y[::2])
    assert np.array_equal(pipe.predict(X[1::2]), reference.predict(X[1::2]))
    np.testing.assert_allclose(pipe.decision_function(X[1::2]), reference.decision_function(X[1::2]),
                               atol=1e-4)
    assert pipe.named_steps["kernel"].gamma_ == pytest.approx(1 / (X.shape[1] * X[::2].var()), rel=1e-5)


def test_linear_svm_dual_follows_the_data_shape():
    wide = CLASSIFIERS["svm"].make(n_samples=100, n_features=1000)
    tall = CLASSIFIERS["svm"].make(n_samples=100_000, n_features=100)
    assert wide.named_steps["clf"].dual is True and tall.named_steps["clf"].dual is False


def test_pca_and_knn_grids_are_capped_by_the_data():
    assert fit_grid({"pca__n_components": [16, 32, 64], "clf__n_neighbors": [5, 10, 20], "clf__C": [1]},
                    n_samples=8, n_features=40) == {
        "pca__n_components": [7], "clf__n_neighbors": [5, 8], "clf__C": [1]}


def test_concatenation_aligns_rows_by_path(tmp_path):
    a, b = two_files(tmp_path)
    fs = load_feature_set([a, b])
    assert fs.name == "alpha+beta" and fs.dataset == "synth" and fs.X.shape == (48, 20)
    X1, y, paths, _ = separable()
    X2, _, _, _ = separable(dim=8, seed=1)
    assert list(fs.paths) == paths
    np.testing.assert_allclose(fs.X[:, :12], l2_normalize(X1), rtol=1e-6)
    np.testing.assert_allclose(fs.X[:, 12:], l2_normalize(X2), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fs.X[:, 12:], axis=1), 1.0, rtol=1e-5)


def test_rows_missing_from_one_file_are_dropped_and_counted(tmp_path):
    X, y, paths, split = separable()
    a = write_features(tmp_path / "d" / "a.h5", X, y, paths, split)
    b = write_features(tmp_path / "d" / "b.h5", X[2:], y[2:], paths[2:], split[2:])
    fs = load_feature_set([a, b])
    assert len(fs.paths) == 46 and fs.n_dropped == 2


def test_concatenation_refuses_inconsistent_files(tmp_path):
    X, y, paths, split = separable()
    a = write_features(tmp_path / "d" / "a.h5", X, y, paths, split)
    other_classes = write_features(tmp_path / "d" / "c.h5", X, y, paths, split, class_names=["x", "y", "z"])
    with pytest.raises(DataError, match="other classes"):
        load_feature_set([a, other_classes])
    moved = ["train" if s == "test" else s for s in split]
    resplit = write_features(tmp_path / "d" / "s.h5", X, y, paths, moved)
    with pytest.raises(DataError, match="another split"):
        load_feature_set([a, resplit])
    elsewhere = write_features(tmp_path / "e" / "a.h5", X, y, [f"x/{p}" for p in paths], split)
    with pytest.raises(DataError, match="no image paths"):
        load_feature_set([a, elsewhere])


def test_fit_cli_saves_model_sidecar_and_results_row(tmp_path, synth, capsys):
    assert main(["--features", str(synth), "--clf", "logreg", "--cv", "3", "--n-jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "precision" in out  # summary and per-class report
    folder = tmp_path / "home" / "models" / "synth"
    bundle = load_user(folder / "alpha__logreg.skops")
    assert bundle["class_names"] == CLASSES and bundle["blocks"][0]["attrs"]["backbone"] == "synthetic"
    assert hasattr(bundle["model"], "predict_proba")
    saved = json.loads((folder / "alpha__logreg.json").read_text())
    assert saved["test_accuracy"] >= 0.9 and len(saved["confusion"]) == 3
    main(["--features", str(synth), "--clf", "svm", "--cv", "3", "--n-jobs", "1"])
    main(["--features", str(synth), "--clf", "logreg", "--cv", "3", "--n-jobs", "1", "--grid", "C=0.5"])
    with open(folder / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert sorted((r["features"], r["clf"]) for r in rows) == [("alpha", "logreg"), ("alpha", "svm")]
    assert [r["best_params"] for r in rows if r["clf"] == "logreg"] == ["C=0.5"]
    assert "| alpha | svm |" in (folder / "results.md").read_text()


def test_fit_defaults_to_the_latest_extract_run(tmp_path, synth):
    pointer = latest_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"data": "x", "files": [str(synth)]}))
    result = fit(clf="nb", cv=3, n_jobs=1)
    assert result.features == "alpha" and result.model.endswith("alpha__nb.skops")


def test_no_features_and_no_extract_run_is_a_usage_error():
    with pytest.raises(UsageError, match="make features"):
        fit(clf="svm")


def test_parse_grid():
    grid = parse_grid(["C=0.1,1,10", "pca__n_components=8;hidden_layer_sizes=(8,),(16, 4)", "solver=lbfgs"])
    assert grid == {"clf__C": [0.1, 1, 10], "pca__n_components": [8],
                    "clf__hidden_layer_sizes": [(8,), (16, 4)], "clf__solver": ["lbfgs"]}
    with pytest.raises(UsageError):
        parse_grid(["C"])


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, synth, capsys):
    from featurepipe.cli import run_main

    assert run_main(main, ["--features", str(synth), "--clf", "forest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logreg" in err and "knn" in err
    assert run_main(main, ["--features", str(synth), "--grid", "gamma=1"]) == 2
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("hello")
    assert run_main(main, ["--features", str(not_h5)]) == 2
    X, y, paths, _ = separable()
    all_test = write_features(tmp_path / "t" / "t.h5", X, y, paths, ["test"] * len(paths))
    assert run_main(main, ["--features", str(all_test)]) == 2
    one = write_features(tmp_path / "o" / "o.h5", X, np.zeros_like(y), paths, ["train"] * len(paths))
    assert run_main(main, ["--features", str(one)]) == 2
    assert "one class" in capsys.readouterr().err


def test_custom_estimator_by_import_path_is_calibrated(synth):
    result = fit([synth], "sklearn.linear_model:RidgeClassifier", cv=3, n_jobs=1, grid={"clf__alpha": [1.0]})
    assert result.status == "ok" and result.test_accuracy >= 0.9
    bundle = load_user(result.model)
    assert bundle["model"].predict_proba(np.ones((1, 12), np.float32)).shape == (1, 3)
    with pytest.raises(UsageError, match="cannot import"):
        get_classifier("nosuch.module:Thing")


class SlowClassifier(ClassifierMixin, BaseEstimator):
    """Sleeps in fit (for the time limit)."""

    def __init__(self, seconds=30.0):
        self.seconds = seconds

    def fit(self, X, y):
        time.sleep(self.seconds)
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        return np.full((len(X), len(self.classes_)), 1 / len(self.classes_))


def test_max_seconds_marks_the_row_timed_out(tmp_path, synth):
    result = fit([synth], SlowClassifier(), cv=2, n_jobs=1, max_seconds=1)
    # the child sleeps 30 s in fit: only the time limit can end it with this status
    assert result.status == "timed out after 1 s" and np.isnan(result.test_accuracy)
    with open(tmp_path / "home" / "models" / "synth" / "results.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["timed out after 1 s"]


def test_a_fit_within_max_seconds_runs_in_a_child_and_returns_the_model(synth):
    result = fit([synth], "logreg", cv=3, n_jobs=1, max_seconds=120)
    assert result.status == "ok" and result.test_accuracy >= 0.9


def test_dask_option_runs_the_search_in_the_distributed_backend(monkeypatch, synth):
    entered = []

    @contextmanager
    def joblib_backend(address, scatter=None):
        entered.append(address)
        assert scatter is not None and len(scatter) == 2  # X and y, sent to the workers once
        yield

    monkeypatch.setitem(sys.modules, "featurepipe.distributed",
                        types.SimpleNamespace(joblib_backend=joblib_backend))
    result = fit([synth], "knn", cv=3, n_jobs=1, dask="local:2", save=False)
    assert entered == ["local:2"] and result.status == "ok"


def test_convergence_warnings_are_counted(synth):
    result = fit([synth], "logreg", cv=3, n_jobs=1, grid={"clf__max_iter": [1]}, save=False)
    assert result.convergence_warnings >= 1
