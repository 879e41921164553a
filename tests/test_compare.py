import csv
import json


from featurepipe import fit as fitmod
from featurepipe.compare import compare, main
from featurepipe.fit import RESULT_COLUMNS

from featurefiles import two_files

REQUIRED = ["features", "clf", "cv_mean", "cv_std", "test_accuracy", "test_macro_f1", "fit_seconds",
            "predict_ms_per_image", "best_params"]


def _csv(folder):
    with open(folder / "results.csv") as fh:
        return list(csv.DictReader(fh))


def test_compare_every_set_and_classifier_then_reuse(tmp_path, monkeypatch, capsys):
    a, b = two_files(tmp_path / "feats")
    folder = tmp_path / "home" / "models" / "synth"
    folder.mkdir(parents=True)
    (folder / "beta__finetune.json").write_text(json.dumps({
        "features": "beta", "clf": "finetune", "test_accuracy": 0.5, "test_macro_f1": 0.4, "fit_seconds": 9.0,
        "predict_ms_per_image": 3.0, "cv_mean": None, "cv_std": None, "best_params": "epochs=3"}))
    rows = compare([a, b], ["logreg", "knn"], cv=3, n_jobs=1)
    assert sorted((r["features"], r["clf"]) for r in rows) == [
        ("alpha", "knn"), ("alpha", "logreg"), ("alpha+beta", "knn"), ("alpha+beta", "logreg"),
        ("beta", "finetune"), ("beta", "knn"), ("beta", "logreg")]
    table = _csv(folder)
    assert list(table[0])[:len(REQUIRED)] == REQUIRED and tuple(table[0]) == RESULT_COLUMNS
    cv = [float(r["cv_mean"]) for r in table if r["cv_mean"]]
    assert cv == sorted(cv, reverse=True) and table[-1]["clf"] == "finetune"  # no CV score: last
    assert all(r["best_params"] for r in table)
    md = (folder / "results.md").read_text()
    assert md.index("| alpha+beta | logreg |") < md.index("| beta | finetune |")
    for png in ("results.png", "confusion.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"

    calls = []
    real_search = fitmod.search
    monkeypatch.setattr(fitmod, "search", lambda **kw: calls.append(kw) or real_search(**kw))
    again = compare([a, b], ["logreg", "knn"], cv=3, n_jobs=1)
    assert calls == [] and [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    compare([a, b], ["knn"], cv=3, n_jobs=1, grid={"clf__n_neighbors": [3]})  # other grid: refit
    assert len(calls) == 3
    compare([a], ["logreg"], cv=3, n_jobs=1, force=True)
    assert len(calls) == 4
    assert len(_csv(folder)) == 7


def test_compare_cli_prints_the_table(tmp_path, capsys):
    a, b = two_files(tmp_path / "feats")
    assert main(["--features", str(a), str(b), "--clf", "nb", "--cv", "3", "--n-jobs", "1", "--no-concat",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| alpha | nb |" in out and "| beta | nb |" in out and "alpha+beta" not in out


def test_compare_accepts_estimator_instances(tmp_path):
    from sklearn.linear_model import RidgeClassifier

    a, _ = two_files(tmp_path / "feats")
    rows = compare([a], [RidgeClassifier()], cv=3, n_jobs=1)
    assert [(r["features"], r["clf"]) for r in rows] == [("alpha", "RidgeClassifier")]
    assert float(rows[0]["test_accuracy"]) >= 0.9


def test_compare_unknown_classifier_exits_2(tmp_path, capsys):
    from featurepipe.cli import run_main

    a, _ = two_files(tmp_path / "feats")
    assert run_main(main, ["--features", str(a), "--clf", "svm", "boost"]) == 2
    assert "unknown classifier 'boost'" in capsys.readouterr().err


def test_compare_finetune_trains_missing_model_once_and_shows_its_row(tmp_path, monkeypatch):
    import featurepipe.finetune as ft

    a, b = two_files(tmp_path / "feats")
    calls = []

    def fake_finetune(*, backbone, features, models_dir, seed, quiet):
        calls.append((backbone, str(features)))
        _, json_path, _ = ft.output_paths(features, models_dir)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"features": "alpha", "clf": "finetune", "test_accuracy": 0.5,
                                         "test_macro_f1": 0.5, "fit_seconds": 1.0}))

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    rows = compare([a, b], ["nb"], cv=3, n_jobs=1, finetune=["synthetic"], concat=False)
    assert calls == [("synthetic", str(a))] or calls == [("synthetic", str(b))]
    assert ("alpha", "finetune") in {(r["features"], r["clf"]) for r in rows}
    compare([a, b], ["nb"], cv=3, n_jobs=1, finetune=["synthetic"], concat=False)
    assert len(calls) == 1  # the saved model is reused, not trained again


def test_two_concurrent_compares_leave_rows_that_name_their_own_models(tmp_path):
    """Two compares of different options on one models folder at once: afterwards every row's
    key and CV are those of its model's sidecar and bundle, and its sha256 that of the file."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from featurepipe.modelfile import load_user

    a, b = two_files(tmp_path)
    base = [sys.executable, "-m", "featurepipe", "compare", "--features", str(a), str(b), "--clf", "logreg", "nb",
            "knn", "--n-jobs", "1", "--quiet"]
    procs = [subprocess.Popen(base + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for extra in (["--cv", "3"], [])]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    folder = tmp_path / "home" / "models" / "synth"
    with open(folder / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9
    for r in rows:
        sidecar = json.loads(Path(r["model"]).with_suffix(".json").read_text())
        metrics = load_user(r["model"])["metrics"]
        assert r["key"] == sidecar["key"] == metrics["key"], r["features"] + " / " + r["clf"]
        assert float(r["cv_mean"]) == pytest.approx(sidecar["cv_mean"], abs=1e-5)
        assert r["model_sha256"] == hashlib.sha256(Path(r["model"]).read_bytes()).hexdigest()
