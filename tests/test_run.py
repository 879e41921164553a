"""``featurepipe run``: the whole job in one command on every layout; a second run reuses
everything; nothing is ever written inside the image folder."""

import csv
import os
from pathlib import Path

import pytest

from conftest import make_dataset
from featurepipe import fit as fitmod
from featurepipe.__main__ import main as featurepipe_main
from featurepipe.run import run
from featurepipe.store import load


def _tree(folder):
    """Every path under ``folder`` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*"))


def _run(data, model_path, **kw):
    return run(data, backbones=[f"file:{model_path}"], preprocess="scale", clfs=["logreg", "knn"],
               cv=2, n_jobs=1, quiet=True, **kw)


@pytest.fixture
def default_homes(tmp_path, monkeypatch):
    """The defaults a new user gets: ./data and ./models in the working folder."""
    monkeypatch.delenv("FEATUREPIPE_DATA")
    monkeypatch.delenv("FEATUREPIPE_MODELS")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_run_on_class_folders_then_again_reuses_everything(tmp_path, tiny_model_path, monkeypatch):
    data = make_dataset(tmp_path / "photos", n_per_class=8)
    first = _run(data, tiny_model_path)
    assert [p.name for p in first.features] == ["tiny.h5"] and len(load(first.features[0])) == 24
    assert {(r["features"], r["clf"]) for r in first.rows} == {("tiny", "logreg"), ("tiny", "knn")}
    assert first.best == first.rows[0] and first.report.is_file()
    assert (first.audit_dir / "summary.json").is_file()
    assert (first.models_dir / "results.md").is_file()

    calls = []
    real_search = fitmod.search
    monkeypatch.setattr(fitmod, "search", lambda **kw: calls.append(kw) or real_search(**kw))
    audit_files = _tree(first.audit_dir)
    second = _run(data, tiny_model_path)
    assert calls == []  # every results row reused
    assert _tree(first.audit_dir) == audit_files  # the audit read back, not written again
    assert [r["cv_mean"] for r in second.rows] == [r["cv_mean"] for r in first.rows]
    text = second.summary()
    for where in ("features:", "models and results:", "audit:", "report:", "best by CV:"):
        assert where in text


def test_run_on_a_split_tree_keeps_the_given_split(tmp_path, tiny_model_path):
    root = tmp_path / "split"
    make_dataset(root / "train", n_per_class=6)
    make_dataset(root / "test", n_per_class=3, start=50)
    result = _run(root, tiny_model_path)
    rows = load(result.features[0], features=False)
    assert sorted(set(rows.split)) == ["test", "train"]
    assert sum(s == "test" for s in rows.split) == 9
    assert int(result.best["n_test"]) == 9


def test_run_on_a_csv_manifest(tmp_path, tiny_model_path):
    images = make_dataset(tmp_path / "shots" / "img", n_per_class=6)
    manifest = tmp_path / "shots" / "labels.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for p in sorted(images.rglob("*.png")):
            writer.writerow([p.relative_to(manifest.parent).as_posix(), p.parent.name])
    before = _tree(images)
    result = _run(manifest, tiny_model_path)
    assert load(result.features[0]).class_names == ["blue", "green", "red"]
    assert result.report.is_file()
    assert _tree(images) == before


def test_nothing_is_written_inside_data_by_any_stage(default_homes, tiny_model_path, capsys):
    make_dataset(default_homes / "data", n_per_class=6)
    before = _tree(default_homes / "data")
    backbone = ["--backbone", f"file:{tiny_model_path}", "--preprocess", "scale"]
    assert featurepipe_main(["extract", "--data", "data", *backbone, "--quiet", "--no-verify"]) == 0
    assert featurepipe_main(["compare", "--clf", "logreg", "--cv", "2", "--n-jobs", "1", "--quiet"]) == 0
    assert featurepipe_main(["audit", "--quiet", "--n-jobs", "1"]) == 0
    assert featurepipe_main(["report"]) == 0
    assert featurepipe_main(["run", "--data", "data", *backbone, "--clf", "logreg", "--cv", "2",
                             "--n-jobs", "1", "--quiet"]) == 0
    assert _tree(default_homes / "data") == before
    out = capsys.readouterr().out
    assert (default_homes / "featurepipe-out" / "data" / "tiny.h5").is_file()
    assert f"report: {(default_homes / 'models' / 'data' / 'report.html').resolve()}" in out
    assert (default_homes / "models" / "data" / "report.html").is_file()


def test_bad_arguments_are_one_line_before_any_work(default_homes, capsys):
    make_dataset(default_homes / "photos", n_per_class=2)
    assert featurepipe_main(["run"]) == 2
    assert featurepipe_main(["run", "--data", "no-such-folder"]) == 2
    assert featurepipe_main(["run", "--data", "photos", "--clf", "no-such-clf"]) == 2
    assert featurepipe_main(["run", "--data", "photos", "--backbone", "no-such-net"]) == 2
    assert featurepipe_main(["run", "--data", "photos", "--cv", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    for line, named in zip(err, ("--data", "no-such-folder", "no-such-clf", "no-such-net", "--cv")):
        assert named in line
    assert not os.path.exists(default_homes / "models") and not os.path.exists(default_homes / "data")
