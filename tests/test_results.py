"""The results table: rows merged under a lock, files replaced atomically."""

import multiprocessing

from featurepipe.results import RESULT_COLUMNS, read_results, results_markdown, update_results

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


def test_rows_replace_by_features_and_clf_and_sort_by_accuracy(tmp_path):
    update_results(tmp_path, [{"features": "a", "clf": "svm", "test_accuracy": 0.5},
                              {"features": "b", "clf": "svm", "test_accuracy": 0.7}])
    table = update_results(tmp_path, [{"features": "a", "clf": "svm", "test_accuracy": 0.9}])
    assert [(r["features"], r["test_accuracy"]) for r in table] == [("a", "0.9"), ("b", "0.7")]
    assert tuple(table[0]) == RESULT_COLUMNS


def test_a_column_added_later_reads_as_empty_from_an_old_table(tmp_path):
    (tmp_path / "results.csv").write_text("features,clf,test_accuracy\na,svm,0.5\n")
    rows = read_results(tmp_path)
    assert rows[0]["features"] == "a" and rows[0]["key"] == "" and tuple(rows[0]) == RESULT_COLUMNS
