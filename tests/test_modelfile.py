"""Model files are data featurepipe wrote: checked (place and sha256) before any implicit load."""

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from featurepipe import audit, predict, report
from featurepipe.classifiers import CLASSIFIERS, calibrated, needs_calibration
from featurepipe.cli import run_main
from featurepipe.compare import compare
from featurepipe.errors import DataError
from featurepipe.modelfile import (MODEL_FORMAT, TRUSTED_TYPES, ModelRefused, load_user, load_written,
                                   save_bundle)
from featurepipe.paths import latest_pointer
from featurepipe.results import update_results
from featurepipe.store import write_json_atomic

from featurefiles import separable, write_features
from test_audit import planted


class Planted:
    """A pickle that touches a file when loaded: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _rows(folder):
    with open(folder / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def compared(tmp_path):
    X, y, paths, split, _ = planted()  # two test images leak: the audit scores each row's model again
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    compare([f], ["logreg"], cv=3, n_jobs=1, plots=False, report=False)
    latest_pointer().parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(latest_pointer(), {"data": "x", "files": [str(f)]})
    return f, tmp_path / "home" / "models" / "synth"


@pytest.mark.parametrize("variant", ["small", "bounded"])
def test_every_registry_classifier_loads_with_the_trusted_types(tmp_path, monkeypatch, variant):
    if variant == "bounded":  # the variants built above the size thresholds (Nystroem, faiss IVF)
        monkeypatch.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "10")
        monkeypatch.setenv("FEATUREPIPE_EXACT_KNN_MAX_ROWS", "10")
    X, y, _, _ = separable(n_per_class=12)
    for name, spec in CLASSIFIERS.items():
        model = spec.make(n_samples=len(y), n_features=X.shape[1], seed=0)
        model = calibrated(model, cv=3) if needs_calibration(model) else model
        model.fit(X, y)
        path = tmp_path / f"{name}.skops"
        sha = save_bundle({"format": MODEL_FORMAT, "model": model}, path)
        loaded = load_written(path, folder=tmp_path, sha256=sha)["model"]  # refuses any other type
        np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X), atol=1e-4, err_msg=name)
    assert "featurepipe.classifiers.RBFKernel" in TRUSTED_TYPES


def test_rows_and_sidecars_record_the_model_sha256(compared):
    import hashlib

    _, folder = compared
    [row] = _rows(folder)
    sidecar = json.loads((folder / "alpha__logreg.json").read_text())
    digest = hashlib.sha256(Path(row["model"]).read_bytes()).hexdigest()
    assert row["model_sha256"] == sidecar["model_sha256"] == digest and row["model"].endswith(".skops")


STAGES = {"report": lambda f: (report.main, ["--features", str(f)]),
          "audit": lambda f: (audit.main, ["--features", str(f), "--seeds", "1", "--n-jobs", "1", "--quiet"]),
          "predict": lambda f: (predict.main, [str(f.parent)])}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_pickle_named_by_results_csv_elsewhere_never_runs(compared, tmp_path, capsys, stage):
    f, folder = compared
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.skops"
    evil.write_bytes(pickle.dumps(Planted(marker)))
    rows = _rows(folder)
    rows[0]["model"] = str(evil)
    rows[0]["model_sha256"] = __import__("hashlib").sha256(evil.read_bytes()).hexdigest()
    update_results(folder, rows)
    func, argv = STAGES[stage](f)
    assert run_main(func, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a model file inside" in err
    assert not marker.exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_pickle_put_in_place_of_a_model_never_runs(compared, tmp_path, capsys, stage):
    f, folder = compared
    marker = tmp_path / "ran"
    [row] = _rows(folder)
    Path(row["model"]).write_bytes(pickle.dumps(Planted(marker)))
    func, argv = STAGES[stage](f)
    assert run_main(func, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 is not the one recorded" in err
    assert not marker.exists()


def test_a_symlink_out_of_the_models_folder_is_refused(compared, tmp_path):
    _, folder = compared
    [row] = _rows(folder)
    outside = tmp_path / "outside.skops"
    Path(row["model"]).rename(outside)
    Path(row["model"]).symlink_to(outside)
    with pytest.raises(ModelRefused, match="not a model file inside"):
        load_written(row["model"], folder=folder, sha256=row["model_sha256"])


def test_untrusted_types_are_refused_even_with_the_right_hash(tmp_path):
    from sklearn.utils import Bunch  # not in the trusted list

    path = tmp_path / "m.skops"
    sha = save_bundle({"format": MODEL_FORMAT, "model": Bunch(a=1)}, path)
    with pytest.raises(DataError, match="does not trust") as refused:  # skipped by report/audit, never built
        load_written(path, folder=tmp_path, sha256=sha)
    assert not isinstance(refused.value, ModelRefused)
    assert load_user(path)["model"]["a"] == 1  # --model: the user's choice


def test_a_user_pickle_by_model_is_the_users_choice(tmp_path):
    import joblib

    joblib.dump({"format": MODEL_FORMAT, "model": None}, tmp_path / "m.joblib")
    assert load_user(tmp_path / "m.joblib")["format"] == MODEL_FORMAT
    with pytest.raises(ModelRefused, match="writes .skops model files only"):  # never unpickled implicitly
        load_written(tmp_path / "m.joblib", folder=tmp_path,
                     sha256=__import__("hashlib").sha256((tmp_path / "m.joblib").read_bytes()).hexdigest())


def test_a_moved_models_folder_still_loads_its_own_models(compared, tmp_path, monkeypatch):
    f, folder = compared
    moved = tmp_path / "moved" / "models"
    moved.parent.mkdir()
    folder.parent.rename(moved)
    monkeypatch.setenv("FEATUREPIPE_MODELS", str(moved))
    [row] = _rows(moved / "synth")
    assert not Path(row["model"]).exists()
    bundle = load_written(row["model"], folder=moved / "synth", sha256=row["model_sha256"])
    assert bundle["format"] == MODEL_FORMAT
    assert run_main(report.main, ["--features", str(f)]) == 0


from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402


class OwnClassifier(ClassifierMixin, BaseEstimator):
    """A user's own estimator class (not in the trusted list)."""

    def __init__(self, C=1.0):
        self.C = C

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        self.inner_ = LogisticRegression(C=self.C).fit(X, y)
        self.classes_ = self.inner_.classes_
        return self

    def predict_proba(self, X):
        return self.inner_.predict_proba(X)

    def predict(self, X):
        return self.inner_.predict(X)


def test_a_model_of_the_users_own_class_is_passed_over_not_fatal(tmp_path):
    X, y, paths, split = separable()
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    rows = compare([f], ["test_modelfile:OwnClassifier"], cv=3, n_jobs=1, plots=False, grid={"clf__C": [1.0]},
                   report=False)
    assert rows[0]["status"] == "ok"
    with pytest.warns(UserWarning, match="does not trust"):
        page = report.report([f])
    assert page.path.is_file()
