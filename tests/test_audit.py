import csv
import json

import numpy as np
import pytest

from featurepipe import audit as auditmod
from featurepipe.audit import (CURVE_COLUMNS, DUPLICATE_COLUMNS, SUSPECT_COLUMNS, CurvePoint, audit,
                               doubling_gain, main, similar_pairs)
from featurepipe.cli import run_main
from featurepipe.compare import compare
from featurepipe.modelfile import load_user
from featurepipe.results import update_results

from conftest import FLOWERS, needs_shared
from featurefiles import CLASSES, write_features


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def planted(n_per_class=40, dim=64, spread=1.0, seed=0):
    """Gaussian clusters (every 5th image in test) with planted problems.

    Returns (X, y, paths, split, planted) where planted names the near-copies (pairs of paths,
    one test copy of a train image among them) and the images given a wrong label.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (len(CLASSES), dim)) * 1.5
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            rows.append([centers[c] + rng.normal(0, spread, dim), c, f"{name}/img_{i:03d}.jpg",
                         "test" if i % 5 == 0 else "train"])
    copies = []
    for src, split in ((1, "train"), (2, "test"), (43, "test")):  # (43: class b)
        x, c, path, _ = rows[src]
        copy = f"{path[:-4]}_copy.jpg"
        rows.append([x + rng.normal(0, 0.01, dim), c, copy, split])
        copies.append((path, copy))
    wrong = []
    for k in (3, 47, 88):  # train images of a, b, c given the next class's label
        rows[k][1] = (rows[k][1] + 1) % len(CLASSES)
        wrong.append(rows[k][2])
    rows.sort(key=lambda r: r[2])
    X = np.array([r[0] for r in rows], dtype=np.float32)
    return (X, np.array([r[1] for r in rows]), [r[2] for r in rows], [r[3] for r in rows],
            {"copies": copies, "wrong": wrong})


def test_similar_pairs_are_the_same_exact_blocked_and_with_faiss():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (300, 24)).astype(np.float32)
    X[150] = X[7] * 2 + 0.01        # a scaled copy: cosine ~1
    X[299] = X[42] + rng.normal(0, 0.05, 24)
    i, j, cos = similar_pairs(X, 0.95)
    assert sorted(zip(i.tolist(), j.tolist())) == [(7, 150), (42, 299)]
    assert np.all(cos >= 0.95) and cos[0] >= cos[1]
    blocked = similar_pairs(X, 0.95, block_bytes=4 * 300 * 7)  # 7 rows per block
    ann = similar_pairs(X, 0.95, exact_max_rows=10)
    for other in (blocked, ann):
        assert other[0].tolist() == i.tolist() and other[1].tolist() == j.tolist()
        np.testing.assert_allclose(other[2], cos, rtol=1e-5)


def test_doubling_gain_is_the_slope_per_doubling():
    pts = [CurvePoint(5, 0.5, 0, 3), CurvePoint(10, 0.80, 0, 3), CurvePoint(20, 0.85, 0, 3), CurvePoint(40, 0.90, 0, 1)]
    assert doubling_gain(pts) == pytest.approx(0.05)


def test_audit_finds_planted_copies_leaks_and_wrong_labels(tmp_path):
    X, y, paths, split, plan = planted()
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    result = audit([f], seeds=2, n_jobs=1)

    out = tmp_path / "home" / "models" / "synth" / "audit"
    assert result.folder == out
    dups = _csv(out / "duplicates.csv")
    assert tuple(dups[0]) == DUPLICATE_COLUMNS
    assert {frozenset((d["path_a"], d["path_b"])) for d in dups} == {frozenset(p) for p in plan["copies"]}
    assert result.leaked_test == ["a/img_002_copy.jpg", "b/img_003_copy.jpg"]
    assert result.n_groups == 3

    suspects = _csv(out / "suspects.csv")
    assert tuple(suspects[0]) == SUSPECT_COLUMNS
    assert {s["path"] for s in suspects[:3]} == set(plan["wrong"])
    scores = [float(s["score"]) for s in suspects]
    assert scores == sorted(scores, reverse=True)
    by_path = {s["path"]: s for s in suspects}
    assert by_path["a/img_003.jpg"]["given"] == "b" and by_path["a/img_003.jpg"]["suggested"] == "a"

    curve = _csv(out / "learning_curve.csv")
    assert tuple(curve[0]) == CURVE_COLUMNS
    assert [int(r["n_per_class"]) for r in curve] == [1, 2, 5, 10, 20, 32]  # last: all 97 train rows / 3
    assert [int(r["n_seeds"]) for r in curve] == [2, 2, 2, 2, 2, 1]
    assert {r["features"] for r in curve} == {"alpha"} and {r["clf"] for r in curve} == {"logreg"}
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == auditmod.DEFAULT_THRESHOLD
    assert (summary["duplicate_pairs"], summary["duplicate_groups"], summary["leaked_test_images"]) == (3, 3, 2)
    assert summary["suspects"] == len(suspects) and 3 <= summary["suspects_flagged"] <= len(suspects)
    assert "3 near-duplicate pairs" in result.summary() and "2 test images" in result.summary()


def test_leak_adjusted_accuracy_fills_every_row(tmp_path):
    X, y, paths, split, plan = planted(spread=4.0)  # overlapping classes: test accuracy < 1
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    compare([f], ["logreg", "knn"], cv=3, n_jobs=1, plots=False)
    audit([f], seeds=1, n_jobs=1)

    folder = tmp_path / "home" / "models" / "synth"
    rows = _csv(folder / "results.csv")
    assert len(rows) == 2 and all(r["test_accuracy_no_leaks"] for r in rows)
    leaked = {"a/img_002_copy.jpg", "b/img_003_copy.jpg"}
    test = [i for i, s in enumerate(split) if s == "test" and paths[i] not in leaked]
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    for r in rows:
        model = load_user(r["model"])["model"]
        expected = np.mean(model.predict(Xn[test]) == y[test])
        assert float(r["test_accuracy_no_leaks"]) == pytest.approx(expected, abs=1e-6)
    assert any(float(r["test_accuracy_no_leaks"]) != float(r["test_accuracy"]) for r in rows)
    assert "warning: test images with a near-duplicate" in (folder / "results.md").read_text()

    compare([f], ["logreg", "knn"], cv=3, n_jobs=1, plots=False)  # rows reused: the column stays
    assert [r["test_accuracy_no_leaks"] for r in _csv(folder / "results.csv")] == [r["test_accuracy_no_leaks"] for r in rows]
    compare([f], ["logreg"], cv=3, n_jobs=1, plots=False, grid={"clf__C": [0.5]})  # new inputs: blank until audited
    again = {r["clf"]: r["test_accuracy_no_leaks"] for r in _csv(folder / "results.csv")}
    assert again["logreg"] == "" and again["knn"] != ""


def test_a_broken_model_is_left_blank_with_a_warning(tmp_path):
    X, y, paths, split, _ = planted()
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    compare([f], ["logreg", "knn"], cv=3, n_jobs=1, plots=False)
    folder = tmp_path / "home" / "models" / "synth"
    rows = _csv(folder / "results.csv")  # a row of an older featurepipe: no sha256 recorded
    for r in rows:
        r["model_sha256"] = "" if r["clf"] == "knn" else r["model_sha256"]
    update_results(folder, rows)
    with pytest.warns(UserWarning, match="alpha__knn.skops: not scored again"):
        audit([f], seeds=1, n_jobs=1)
    rows = {r["clf"]: r["test_accuracy_no_leaks"] for r in _csv(folder / "results.csv")}
    assert rows["knn"] == "" and rows["logreg"] != ""


def test_no_leaks_means_the_test_accuracy(tmp_path):
    X, y, paths, split, _ = planted()
    keep = [i for i, p in enumerate(paths) if not p.endswith("_copy.jpg")]
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X[keep], y[keep],
                       [paths[i] for i in keep], [split[i] for i in keep])
    compare([f], ["knn"], cv=3, n_jobs=1, plots=False)
    result = audit([f], seeds=1, n_jobs=1)
    assert result.duplicates == [] and result.leaked_test == []
    row, = _csv(tmp_path / "home" / "models" / "synth" / "results.csv")
    assert row["test_accuracy_no_leaks"] == row["test_accuracy"]


def test_cli_prints_summary_and_warns_about_leaks(tmp_path, capsys):
    X, y, paths, split, _ = planted()
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    assert run_main(main, ["--features", str(f), "--seeds", "1", "--n-jobs", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "3 near-duplicate pairs" in captured.out and "doubling the images per class" in captured.out
    assert captured.err.startswith("warning: 2 test images have a near-duplicate")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(main, []) == 2  # no --features and no extract run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--features" in err

    X, y, paths, split, _ = planted()
    a = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    b = write_features(tmp_path / "feats" / "synth" / "beta.h5", X, y, [f"other/{p}" for p in paths], split)
    assert run_main(main, ["--features", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "share no image paths" in err
    assert run_main(main, ["--features", str(a), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_duplicates_are_searched_in_whitened_space():
    """Features sharing a large common direction (like pooled ReLU outputs): every plain cosine is
    high, the whitened one still tells the two copies from the rest."""
    from featurepipe.audit import find_duplicates
    from featurepipe.fit import FeatureSet

    rng = np.random.default_rng(3)
    X = 10 + rng.normal(0, 1, (200, 32)).astype(np.float32)
    X[100] = X[3] + rng.normal(0, 0.05, 32)
    X[150] = X[60] + rng.normal(0, 0.05, 32)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert np.sort((Xn @ Xn.T).ravel())[len(X)] > 0.95  # plain cosine: every pair looks alike
    paths = np.array([f"a/{i:03d}.jpg" for i in range(200)], dtype=object)
    fs = FeatureSet(name="x", dataset="d", X=X, y=np.zeros(200, np.int32), paths=paths,
                    split=np.array(["train"] * 200, dtype=object), class_names=["a"], blocks=[])
    pairs, groups, _ = find_duplicates(fs)
    assert sorted((p.path_a, p.path_b) for p in pairs) == [("a/003.jpg", "a/100.jpg"), ("a/060.jpg", "a/150.jpg")]
    assert groups == 2


# --------------------------------------------------------------------------- small sets (issue 28, item 5)


def _copies_found(pairs, planted):
    found = {frozenset((p.path_a, p.path_b)) for p in pairs}
    return [pair for pair in planted if frozenset(pair) in found]


def test_small_set_is_whitened_on_fewer_axes_and_its_copies_are_found():
    """60 rows of 512 dimensions: whitening all 59 axes makes every cosine -1/(n-1); the audit
    whitens at most one axis per two rows and finds the planted copies."""
    from featurepipe.audit import find_duplicates, whitened
    from featurepipe.fit import FeatureSet

    rng = np.random.default_rng(5)
    X = 5 + rng.normal(0, 1, (60, 512)).astype(np.float32)
    planted_rows = [(2, 30), (11, 45), (20, 59)]
    for a, b in planted_rows:
        X[b] = X[a] + rng.normal(0, 0.1, 512)
    paths = np.array([f"a/{i:03d}.jpg" for i in range(60)], dtype=object)
    fs = FeatureSet(name="x", dataset="d", X=X, y=np.zeros(60, np.int32), paths=paths,
                    split=np.array(["train"] * 60, dtype=object), class_names=["a"], blocks=[])
    Xw, space = whitened(fs.X)
    assert space == "whitened to 30 axes" and Xw.shape == (60, 30)
    pairs, groups, search = find_duplicates(fs)
    planted = [(paths[a], paths[b]) for a, b in planted_rows]
    assert _copies_found(pairs, planted) == planted
    assert len(pairs) == 3 and groups == 3 and search.warning == ""


def test_too_few_images_to_whiten_searches_centred_and_says_so(tmp_path):
    from featurefiles import separable

    X, y, paths, split = separable(n_per_class=9, dim=64)  # 27 rows: fewer than 2 x 16 axes
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    result = audit([f], seeds=1, n_jobs=1)
    assert result.search.endswith("on the centred features")
    assert any("too few to whiten" in note for note in result.notes)
    assert "too few to whiten" in result.summary()
    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["duplicate_search"] == result.search and summary["notes"] == result.notes


@needs_shared
def test_sixty_real_photos_with_planted_copies_are_found(tmp_path):
    """55 flowers5 photos and 5 copies of them (resized to 80 % or re-encoded at JPEG quality 60),
    features of the squeezenet backbone: every copy is paired with its original."""
    from PIL import Image

    from featurepipe.audit import find_duplicates
    from featurepipe.extract import extract
    from featurepipe.fit import load_feature_set

    root = tmp_path / "flowers60"
    planted_pairs = []
    for k, cls in enumerate(sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())):
        (root / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((FLOWERS / cls).glob("*.jpg"))[:11]):
            img = Image.open(src).convert("RGB")
            img.save(root / cls / src.name, quality=95)
            if i == 0:
                copy = img.resize((img.width * 4 // 5, img.height * 4 // 5)) if k % 2 else img
                copy.save(root / cls / f"copy_{src.name}", quality=60)
                planted_pairs.append((f"{cls}/{src.name}", f"{cls}/copy_{src.name}"))
    extract(root, ["squeezenet"], out=tmp_path / "features", quiet=True, verify=0)
    fs = load_feature_set([tmp_path / "features" / "squeezenet.h5"])
    assert len(fs.paths) == 60
    pairs, _, search = find_duplicates(fs)
    assert search.space == "whitened to 30 axes" and search.warning == ""
    assert sorted(_copies_found(pairs, planted_pairs)) == sorted(planted_pairs)


# --------------------------------------------------------------------------- bounded paths (issue 27)


def test_past_large_rows_the_audit_takes_its_bounded_paths_and_says_so(tmp_path, monkeypatch):
    """The thresholds lowered to this 123-image set: IVF search, suspects on PCA axes with
    cleanlab's batched search, a capped curve on sampled test rows, each named in the notes."""
    import cleanlab.experimental.label_issues_batched as batched

    calls = []
    real = batched.find_label_issues_batched
    monkeypatch.setattr(batched, "find_label_issues_batched", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(auditmod, "CURVE_MAX_TRAIN_ROWS", 30)
    monkeypatch.setattr(auditmod, "CURVE_MAX_TEST_ROWS", 10)
    monkeypatch.setattr(auditmod, "LARGE_PCA_DIMS", 16)
    X, y, paths, split, plan = planted()
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    result = audit([f], seeds=2, n_jobs=1, large_rows=100, exact_max_rows=100)

    assert result.search.startswith("approximate (faiss IVF")
    assert {frozenset((d.path_a, d.path_b)) for d in result.duplicates} >= {frozenset(p) for p in plan["copies"]}
    assert len(calls) == 1 and calls[0]["n_jobs"] == 1          # batched, in this process
    assert {s.path for s in result.suspects} >= set(plan["wrong"])
    assert [p.n_per_class for p in result.curve[:-1]] == [1, 2, 5, 10]  # 3 classes x 10 <= 30 rows
    assert result.curve[-1].n_per_class > 10                     # the last point: all train rows
    notes = " ".join(result.notes)
    assert "IVF" in notes and "16 main axes" in notes and "batched" in notes and "at most 30 train rows" in notes
    assert all(f"note: {n}" in result.summary() for n in result.notes)
    small = audit([f], seeds=2, n_jobs=1)                          # defaults: none of it
    assert small.notes == [] and small.search.startswith("exact")
