"""Selection by cross-validation only: the row with the best test score but a worse CV score is
never the winner of compare, the first row of results.md, the report's best model or predict's
default model."""

import numpy as np

from featurefiles import CLASSES, write_features
from featurepipe.compare import compare, main as compare_main
from featurepipe.paths import latest_pointer
from featurepipe.predict import default_model
from featurepipe.report import report
from featurepipe.store import write_json_atomic

N_PER_CLASS = 24


def _rows(seed=0):
    """Labels, paths and splits of a three-class set: every fourth image of a class is a test image."""
    y, paths, split = [], [], []
    for c, name in enumerate(CLASSES):
        for i in range(N_PER_CLASS):
            y.append(c)
            paths.append(f"{name}/img_{i:03d}.jpg")
            split.append("test" if i % 4 == 0 else "train")
    order = np.argsort(paths)
    return np.array(y)[order], [paths[i] for i in order], [split[i] for i in order]


def _features(y, split, *, wrong_train=0.0, wrong_test=0.0, seed=0):
    """Clusters per class; a fraction of the train (test) rows sits at another class's centre."""
    rng = np.random.default_rng(seed)
    centers = np.eye(len(CLASSES), 8) * 10
    X = np.empty((len(y), 8), np.float32)
    for k, (label, part) in enumerate(zip(y, split)):
        wrong = wrong_test if part == "test" else wrong_train
        shown = (label + 1) % len(CLASSES) if rng.random() < wrong else label
        X[k] = centers[shown] + rng.normal(0, 0.5, 8)
    return np.abs(X)


def _two_feature_sets(root):
    y, paths, split = _rows()
    split_arr = np.array(split)
    good_cv = write_features(root / "ds" / "goodcv.h5", _features(y, split_arr, wrong_test=1.0), y, paths, split)
    good_test = write_features(root / "ds" / "goodtest.h5", _features(y, split_arr, wrong_train=0.3, seed=1),
                               y, paths, split)
    return good_cv, good_test


def test_the_best_cv_row_wins_everywhere_although_another_row_has_the_best_test_score(tmp_path, capsys):
    good_cv, good_test = _two_feature_sets(tmp_path)
    rows = compare([good_cv, good_test], ["logreg"], cv=3, n_jobs=1, concat=False, report=False)
    by_name = {r["features"]: r for r in rows}
    assert float(by_name["goodcv"]["cv_mean"]) > float(by_name["goodtest"]["cv_mean"])
    assert float(by_name["goodtest"]["test_accuracy"]) > float(by_name["goodcv"]["test_accuracy"])
    assert rows[0]["features"] == "goodcv"  # compare's ranking

    folder = tmp_path / "home" / "models" / "ds"
    first_row = (folder / "results.md").read_text().splitlines()[2]
    assert first_row.startswith("| goodcv | logreg |")

    assert compare_main(["--features", str(good_cv), str(good_test), "--clf", "logreg", "--cv", "3",
                         "--n-jobs", "1", "--no-concat", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "best by CV: goodcv / logreg" in printed

    page = report([good_cv, good_test])
    assert page.best == "goodcv / logreg"
    html = page.path.read_text()
    assert "Best model: goodcv / logreg" in html and "never used to rank or choose" in html

    latest_pointer().parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(latest_pointer(), {"data": "x", "files": [str(good_cv), str(good_test)]})
    assert default_model().name == "goodcv__logreg.skops"
