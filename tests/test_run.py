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


def test_a_run_with_other_backbones_ranks_only_its_own_rows_everywhere(tmp_path, tiny_model_path, capsys):
    import shutil

    from featurepipe.compare import main as compare_main
    from featurepipe.predict import default_model
    from featurepipe.results import read_results

    data = make_dataset(tmp_path / "photos", n_per_class=8)
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    shutil.copy(tiny_model_path, first)
    shutil.copy(tiny_model_path, second)
    kw = dict(preprocess="scale", clfs=["logreg", "knn"], cv=2, n_jobs=1, quiet=True)
    old = run(data, backbones=[f"file:{first}"], **kw)
    make_dataset(data, n_per_class=4, start=8)  # more images: the first run's rows are of an older file
    new = run(data, backbones=[f"file:{second}"], **kw)
    assert {r["features"] for r in new.rows} == {"second"} and new.best["features"] == "second"
    table = read_results(new.models_dir)
    assert table[0]["features"] == "second" and {r["features"] for r in table} == {"first", "second"}
    markdown = (new.models_dir / "results.md").read_text()
    assert markdown.index("| second |") < markdown.index("Rows of other feature files") < markdown.index("| first |")
    assert new.report.read_text().count("Best model: second / ") == 1
    assert default_model().name.startswith("second__")
    assert compare_main(["--clf", "logreg", "knn", "--cv", "2", "--n-jobs", "1", "--quiet"]) == 0
    assert f"best by CV: {new.best['features']} / {new.best['clf']}" in capsys.readouterr().out
    assert old.best["features"] == "first"


def test_rows_of_a_feature_file_that_changed_are_dropped(tmp_path, tiny_model_path):
    from featurepipe.compare import compare
    from featurepipe.results import read_results

    data = make_dataset(tmp_path / "photos", n_per_class=8)
    result = _run(data, tiny_model_path)
    before = read_results(result.models_dir)
    assert {r["clf"] for r in before} == {"logreg", "knn"}
    make_dataset(data, n_per_class=2, start=8)
    again = _run(data, tiny_model_path)  # the file grew: its rows are refitted, none is stale
    rows = read_results(again.models_dir)
    assert len(rows) == 2 and all(int(r["n_train"]) > int(before[0]["n_train"]) for r in rows)
    compare(again.features, ["nb"], cv=2, n_jobs=1, report=False)  # refits nb only; logreg/knn unchanged
    assert {r["clf"] for r in read_results(again.models_dir)} == {"logreg", "knn", "nb"}
    make_dataset(data, n_per_class=2, start=10)
    from featurepipe.extract import extract
    extract(data, [f"file:{tiny_model_path}"], out=again.features[0].parent, preprocess="scale", quiet=True,
            verify=0)
    compare(again.features, ["nb"], cv=2, n_jobs=1, report=False)
    assert {r["clf"] for r in read_results(again.models_dir)} == {"nb"}  # logreg/knn were of the old file


def test_before_any_work_run_refuses_what_would_fail_later(tmp_path, tiny_model_path, capsys, monkeypatch):
    backbone = ["--backbone", f"file:{tiny_model_path}", "--preprocess", "scale"]
    one = make_dataset(tmp_path / "one", n_per_class=3, classes=("red",))
    make_dataset(tmp_path / "two", n_per_class=3)
    monkeypatch.chdir(tmp_path / "two")
    monkeypatch.setenv("FEATUREPIPE_MODELS", str(tmp_path / "two" / "models"))
    calls = [["run", "--data", str(one), *backbone],                                 # one class
             ["run", "--data", str(tmp_path / "two"), *backbone, "--n-jobs", "0"],
             ["run", "--data", ".", *backbone, "--out", str(tmp_path / "elsewhere")]]  # models inside it
    for argv in calls:
        assert featurepipe_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "two or more" in err[0] and "--n-jobs" in err[1] and "models folder" in err[2]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "two" / "models").exists()


def test_csv_manifests_that_are_not_utf8_or_name_missing_files_are_one_line(tmp_path, tiny_model_path, capsys):
    images = make_dataset(tmp_path / "img", n_per_class=2)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,label\nimg/red/img_000.png,rouge\u00e9\n".encode("latin-1"))
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("path,label\nimg/red/img_000.png,red\n".encode("utf-16"))
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nimg/red/nope.png,red\nimg/blue/nope.png,blue\n")
    backbone = ["--backbone", f"file:{tiny_model_path}", "--preprocess", "scale"]
    for manifest in (latin, utf16):
        assert featurepipe_main(["run", "--data", str(manifest), *backbone]) == 2
    assert featurepipe_main(["extract", "--data", str(missing), *backbone, "--quiet", "--no-verify"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("warning: class ")]  # extract warns: one image per class
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "UTF-8" in err[0] and "UTF-8" in err[1] and "img/blue/nope.png" in err[2]
    assert images.is_dir()


def test_a_manifest_naming_files_outside_its_folder_runs_with_allow_outside(tmp_path, tiny_model_path):
    make_dataset(tmp_path / "data", n_per_class=3)
    manifest = tmp_path / "csvs" / "m.csv"
    manifest.parent.mkdir()
    rows = [f"../data/{p.relative_to(tmp_path / 'data').as_posix()},{p.parent.name}"
            for p in sorted((tmp_path / "data").rglob("*.png"))]
    manifest.write_text("\n".join(rows) + "\n")
    assert featurepipe_main(["run", "--data", str(manifest), "--backbone", f"file:{tiny_model_path}",
                             "--preprocess", "scale", "--clf", "logreg", "--cv", "2", "--n-jobs", "1",
                             "--no-audit", "--allow-outside", "--quiet"]) == 0


def test_missing_files_are_listed_and_featurepipes_own_folder_is_not_a_class(default_homes, tiny_model_path,
                                                                             capsys):
    from featurepipe.extract import extract

    data = make_dataset(default_homes / "data", n_per_class=3)
    other = make_dataset(default_homes / "other", n_per_class=2)
    extract(other, [f"file:{tiny_model_path}"], preprocess="scale", quiet=True, verify=0)  # -> data/features/other
    (data / "red" / "gone.png").symlink_to(data / "red" / "nothing.png")
    (data / "purple").symlink_to(default_homes / "no-such-folder")
    with pytest.warns(UserWarning, match="purple"):
        [result] = extract("data", [f"file:{tiny_model_path}"], preprocess="scale", verify=0)
    assert load(result.path).class_names == ["blue", "green", "red"]
    assert "skipped red/gone.png: file not found" in capsys.readouterr().err


def test_names_with_mathtext_characters_run_the_whole_job(tmp_path, tiny_model_path, capsys):
    """Class and folder names with ``$ \\ _ ^`` are shown as written, never parsed as mathtext."""
    import shutil

    data = make_dataset(tmp_path / "src", n_per_class=6)
    names = {"blue": r"$\frac{a}$", "green": "x_1^2 $y$", "red": r"back\slash$"}
    root = tmp_path / r"d$\frac{b}{c}$_^"
    for old, new in names.items():
        shutil.move(str(data / old), str(root / new))
    argv = ["run", "--data", str(root), "--backbone", f"file:{tiny_model_path}", "--preprocess", "scale",
            "--clf", "logreg", "--cv", "2", "--n-jobs", "1", "--quiet"]
    assert featurepipe_main(argv) == 0, capsys.readouterr().err
    models = tmp_path / "home" / "models" / root.name
    for png in ("results.png", "confusion.png", "audit/learning_curve.png"):
        assert (models / png).stat().st_size > 0, png
    assert sorted(load(next((tmp_path / "home" / "data" / "features" / root.name).glob("*.h5"))).class_names) \
        == sorted(names.values())
    assert r"$\frac{a}$" in (models / "report.html").read_text()


def test_a_symlink_to_the_models_folder_never_becomes_a_class(tmp_path, tiny_model_path):
    data = make_dataset(tmp_path / "photos", n_per_class=6)
    models = tmp_path / "home" / "models"
    (data / "models_link").symlink_to(models, target_is_directory=True)
    (data / "results_link").symlink_to(models / "photos", target_is_directory=True)
    first = _run(data, tiny_model_path, audit=False)
    assert (first.models_dir / "results.png").is_file()
    second = _run(data, tiny_model_path, audit=False)
    for result in (first, second):
        assert load(result.features[0]).class_names == ["blue", "green", "red"]
        assert len(load(result.features[0])) == 18


def test_a_manifest_with_an_absolute_row_keeps_a_usable_output_folder(tmp_path):
    """An absolute row (``/etc/passwd``) with --allow-outside no longer makes '/' the image
    folder: the default output is accepted, and an --out among the images is refused naming
    their folder, so the fix the message names (another --out) works."""
    from featurepipe.errors import UsageError
    from featurepipe.extract import outputs_and_images

    make_dataset(tmp_path / "imgs", n_per_class=2)
    manifest = tmp_path / "m.csv"
    rows = [f"imgs/{p.relative_to(tmp_path / 'imgs').as_posix()},{p.parent.name}"
            for p in sorted((tmp_path / "imgs").rglob("*.png"))]
    manifest.write_text("\n".join(rows + ["/etc/passwd,red"]) + "\n")
    out, index = outputs_and_images(manifest, None, allow_outside=True)
    assert "/etc/passwd" in index.paths and not str(out).startswith("/etc")
    with pytest.raises(UsageError, match="inside the image folder '.*imgs.red'") as refused:
        outputs_and_images(manifest, tmp_path / "imgs" / "red" / "out", allow_outside=True)
    assert "'/'" not in str(refused.value)
    assert outputs_and_images(manifest, tmp_path / "elsewhere", allow_outside=True)[0] == tmp_path / "elsewhere"


@pytest.mark.parametrize("layout, options, named", [
    ({"blue": 6, "green": 6, "red": 1}, [], "class 'red' has 1 image;"),
    ({"blue": 6, "green": 6, "red": 6}, ["--test-size", "0.99"], "--test-size 0.99"),
    ({f"c{k:02d}": 2 for k in range(40)}, [], "class 'c00' keeps 1 of its 2 images"),
])
@pytest.mark.parametrize("stage", ["run", "extract"])
def test_class_sizes_are_refused_before_any_extraction(tmp_path, tiny_model_path, capsys, monkeypatch, layout,
                                                       options, named, stage):
    from conftest import make_image

    data = tmp_path / "photos"
    for k, (name, n) in enumerate(layout.items()):
        for i in range(n):
            make_image(data / name / f"img_{i}.png", (k * 6 % 255, 40, 200), size=(8, 8), seed=i)
    argv = [stage, "--data", str(data), "--backbone", f"file:{tiny_model_path}", "--preprocess", "scale",
            "--quiet", *options]
    if stage == "extract":  # extract warns (its features may serve other ends), first thing
        from featurepipe import extract as extractmod

        def extract_nothing(*args):
            raise AssertionError("extraction started")

        monkeypatch.setattr(extractmod, "_extract_all", extract_nothing)
        with pytest.raises(AssertionError, match="extraction started"), pytest.warns(UserWarning) as warned:
            extractmod.main(argv[1:])
        err = str(warned[0].message)
        assert named in err and ("--test-size" in err or "add images" in err), err
        return
    assert featurepipe_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and ("--test-size" in err or "add images" in err), err
    assert not (tmp_path / "home" / "data" / "features").exists()  # nothing was extracted
