"""The results table: rows merged under a lock, files replaced atomically."""

import multiprocessing

from featurepipe.results import (RESULT_COLUMNS, best_row, ranked, read_results, results_markdown,
                                 update_results)

WRITERS, ROWS_EACH = 5, 30


def _write_rows(folder, writer):
    for i in range(ROWS_EACH):
        update_results(folder, [{"features": f"set{writer}", "clf": f"clf{i}", "test_accuracy": i / 100}])


def test_concurrent_writers_keep_every_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(tmp_path, w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    rows = read_results(tmp_path)
    assert len(rows) == WRITERS * ROWS_EACH
    assert {(r["features"], r["clf"]) for r in rows} == {
        (f"set{w}", f"clf{i}") for w in range(WRITERS) for i in range(ROWS_EACH)}
    markdown = (tmp_path / "results.md").read_text()
    assert markdown == results_markdown(rows)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_rows_replace_by_features_and_clf_and_rank_by_cv_not_test(tmp_path):
    update_results(tmp_path, [{"features": "a", "clf": "svm", "cv_mean": 0.80, "test_accuracy": 0.99},
                              {"features": "b", "clf": "svm", "cv_mean": 0.90, "test_accuracy": 0.70}])
    table = update_results(tmp_path, [{"features": "a", "clf": "svm", "cv_mean": 0.85, "test_accuracy": 0.95}])
    assert [(r["features"], r["cv_mean"], r["test_accuracy"]) for r in table] == [
        ("b", "0.9", "0.7"), ("a", "0.85", "0.95")]
    assert tuple(table[0]) == RESULT_COLUMNS


def test_ties_on_cv_go_to_the_lower_std_then_the_faster_fit_and_rows_without_cv_last():
    rows = [{"features": "slow", "clf": "x", "cv_mean": "0.9", "cv_std": "0.01", "fit_seconds": "50"},
            {"features": "none", "clf": "finetune", "cv_mean": "", "test_accuracy": "0.99"},
            {"features": "wide", "clf": "x", "cv_mean": "0.9", "cv_std": "0.05", "fit_seconds": "1"},
            {"features": "fast", "clf": "x", "cv_mean": "0.9", "cv_std": "0.01", "fit_seconds": "2"},
            {"features": "top", "clf": "x", "cv_mean": "0.91", "cv_std": "0.09", "fit_seconds": "99",
             "status": "timed out after 1 s"}]
    for r in rows:
        r.setdefault("status", "ok")
    assert [r["features"] for r in ranked(rows)] == ["top", "fast", "slow", "wide", "none"]
    assert best_row(rows)["features"] == "fast"  # "top" did not finish, "none" has no CV score
    assert "cross-validation" in results_markdown(ranked(rows))


def test_a_column_added_later_reads_as_empty_from_an_old_table(tmp_path):
    (tmp_path / "results.csv").write_text("features,clf,test_accuracy\na,svm,0.5\n")
    rows = read_results(tmp_path)
    assert rows[0]["features"] == "a" and rows[0]["key"] == "" and tuple(rows[0]) == RESULT_COLUMNS
