"""The results table: one row per (features, classifier), in ``models/<dataset>/results.csv`` and
``results.md``. Every writer (fit, compare, finetune) goes through ``update_results``.

Concurrent writers are safe: the update holds an exclusive lock on ``results.csv.lock`` while it
reads the current table, merges its rows in and writes both files under temporary names renamed
into place, so no writer's rows are lost and a reader never sees a half-written file.

Rows are ranked by ``selection_key``, the one rule every "best" in featurepipe follows
(``SELECTION_RULE``): the cross-validation score on the training rows decides; the test accuracy
is measured once per row and shown, never used to choose. Only rows of the same feature files are
ranked together: the files of the latest ``compare`` (or ``run``) are the folder's current set
(``current_rows``), their rows come first and every "best" is one of them; rows of other feature
files (an earlier run with other backbones) follow, ranked among themselves. A row whose feature
files changed since its fit (``inputs``) is dropped when the current set is recorded.

To add a column, append it to ``RESULT_COLUMNS`` (old tables read it as empty).
"""

import csv
import fcntl
import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from .csvcells import dict_writer, unescape

RESULT_COLUMNS = ("features", "clf", "cv_mean", "cv_std", "test_accuracy", "test_macro_f1",
                  "fit_seconds", "predict_ms_per_image", "best_params", "status",
                  "convergence_warnings", "n_train", "n_test", "model", "key", "test_accuracy_no_leaks",
                  "inputs", "model_sha256")
ROW_KEY = ("features", "clf")
SELECTION_RULE = ("rows are ranked by their cross-validation accuracy on the training rows (ties: the "
                  "lower CV std, then the faster fit); the test accuracy is measured once per row and "
                  "never used to rank or choose")


def read_results(folder):
    """Rows of ``folder/results.csv`` as dicts of strings, one key per column (empty when absent)."""
    path = Path(folder) / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{c: unescape(r.get(c) or "") for c in RESULT_COLUMNS} for r in csv.DictReader(fh)]


def saved_row(saved, path):
    """The table row of a result saved as JSON (``<features>__<clf>.json``) at ``path``."""
    row = {c: saved.get(c) for c in RESULT_COLUMNS}
    row.update(features=saved.get("features") or Path(path).name.split("__")[0],
               clf=saved.get("clf") or "finetune", status=saved.get("status") or "ok",
               model=saved.get("model") or str(Path(path).with_suffix(".keras")))
    return row


def finetune_rows(folder):
    """Rows from the ``<backbone>__finetune.json`` files saved by ``featurepipe.finetune``."""
    rows = []
    for path in sorted(Path(folder).glob("*__finetune.json")):
        try:
            rows.append(saved_row(json.loads(path.read_text()), path))
        except (OSError, ValueError):
            warnings.warn(f"unreadable fine-tune result {path}", stacklevel=2)
    return rows


CURRENT_RECORD = ".current-features.json"  # in models/<dataset>/: the stems of the current set


def update_results(folder, rows, *, features=None):
    """Add or replace ``rows`` (by features and clf) in ``results.csv`` and rewrite ``results.md``.

    Parameters
    ----------
    folder : str or Path
        ``models/<dataset>/``.
    rows : list of dict
    features : list of str or Path, optional
        The feature files these rows were fitted on (compare's files): they become the folder's
        current set, and rows of these files whose ``inputs`` no longer match them are dropped.

    Returns
    -------
    list of dict
        The table's rows: the current set's first, each part ranked (``ranked``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".results.csv.lock"):
        table = {_key(r): r for r in read_results(folder)}
        for r in rows:
            new = {c: cell(r.get(c, "")) for c in RESULT_COLUMNS}
            old = table.get(_key(new), {})
            if not new["test_accuracy_no_leaks"] and old.get("key", "") == new["key"]:
                new["test_accuracy_no_leaks"] = old.get("test_accuracy_no_leaks", "")  # same inputs, same value
            table[_key(new)] = new
        if features is not None:
            fresh = {_key({c: cell(r.get(c, "")) for c in ROW_KEY}) for r in rows}
            table = {k: r for k, r in table.items() if k in fresh or not _outdated(r, features)}
            _write_atomic(folder / CURRENT_RECORD,
                          lambda fh: json.dump({"features": [Path(f).stem for f in features]}, fh))
        ordered = ordered_rows(table.values(), current_stems(folder))
        n_current = len(current_rows(ordered, folder))
        _write_atomic(folder / "results.csv", lambda fh: _write_csv(fh, ordered))
        _write_atomic(folder / "results.md", lambda fh: fh.write(results_markdown(ordered, n_current=n_current)))
    return ordered


def inputs_digest(files):
    """A digest of feature files by name, size and modification time (a row's ``inputs``)."""
    import hashlib

    parts = [[Path(f).stem, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _outdated(row, features):
    """True for a row whose feature files (beside ``features``) changed or went since its fit."""
    if not row.get("inputs") or not features:
        return False
    folder = Path(features[0]).parent
    try:
        return inputs_digest([folder / f"{s}.h5" for s in str(row["features"]).split("+")]) != row["inputs"]
    except OSError:
        return True


def current_stems(folder):
    """The feature-file stems of the folder's current set, or None when none is recorded."""
    try:
        return list(json.loads((Path(folder) / CURRENT_RECORD).read_text())["features"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _in_set(row, stems):
    return stems is None or set(str(row.get("features", "")).split("+")) <= set(stems)


def current_rows(rows, folder):
    """The rows made from the folder's current feature files only (all rows when none is recorded)."""
    stems = current_stems(folder)
    return [r for r in rows if _in_set(r, stems)]


def ordered_rows(rows, stems):
    """The rows of the feature files ``stems`` ranked, then the others ranked (``stems`` None: all ranked)."""
    rows = list(rows)
    return ranked([r for r in rows if _in_set(r, stems)]) + ranked([r for r in rows if not _in_set(r, stems)])


@contextmanager
def _locked(path):
    """An exclusive lock held by this process (released by the OS if it dies)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_HELD = {}  # real path of a models folder -> depth of models_folder_lock held by this process


@contextmanager
def models_folder_lock(folder):
    """Hold ``folder/.models.lock`` (a models folder) for a whole compare or fit: a second one
    on the same folder waits (saying so on stderr), so each results row names the model file
    fitted with it. Re-entrant within a process (compare holds it around its fits)."""
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(folder)
    if _HELD.get(real):
        _HELD[real] += 1
        try:
            yield
        finally:
            _HELD[real] -= 1
        return
    with open(folder / ".models.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another compare or fit on '{folder}' to finish", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD[real] = 1
        try:
            yield
        finally:
            _HELD.pop(real, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(row):
    return tuple(str(row[k]) for k in ROW_KEY)


def selection_key(row):
    """The sort key of a results row: higher CV mean first, then lower CV std, then faster fit.

    Rows without a CV score (a timed-out fit, the fine-tuned row) come last. The test accuracy
    is not part of the key.
    """
    def low_first(value):
        value = number(value)
        return math.inf if math.isnan(value) else value

    return (low_first(-number(row.get("cv_mean"))), low_first(row.get("cv_std")),
            low_first(row.get("fit_seconds")), str(row.get("features")), str(row.get("clf")))


def ranked(rows):
    """``rows`` (dicts with the results columns) sorted by ``selection_key``, best first."""
    return sorted(rows, key=selection_key)


def can_be_chosen(row):
    """True for a row that finished with a CV score (the only rows a "best" may be)."""
    return str(row.get("status", "")).startswith("ok") and not math.isnan(number(row.get("cv_mean")))


def best_row(rows):
    """The best row by ``selection_key`` among those that finished with a CV score, or None."""
    usable = [r for r in rows if can_be_chosen(r)]
    return ranked(usable)[0] if usable else None


def _write_csv(fh, rows):
    writer = dict_writer(fh, RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def number(value):
    """``float(value)``, nan when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def cell(value):
    """A table cell: floats to 6 significant digits, None and nan empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _fmt(value, digits):
    v = number(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


TABLE_HEAD = ["| features | clf | CV accuracy (train) | test accuracy | test acc. no leaks | test macro-F1 | fit s | predict ms/img | best params | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]


def results_markdown(rows, *, limit=None, n_current=None):
    """A Markdown table of result rows (dicts), in the given order (``ranked`` gives the rule's);
    with ``limit``, only the first rows, and a line counting the others; with ``n_current``, the
    rows after the first ``n_current`` go to a second table (other feature files)."""
    lines = list(TABLE_HEAD)
    for k, r in enumerate(rows[:limit]):
        if n_current is not None and k == n_current:
            lines += ["", "Rows of other feature files (an earlier run; not ranked with the rows above):", ""]
            lines += TABLE_HEAD
        cv = (f"{number(r['cv_mean']):.4f} ± {number(r['cv_std']):.4f}"
              if not math.isnan(number(r.get("cv_mean"))) else "–")
        warned = r.get("convergence_warnings") not in ("", "0", 0, None)
        lines.append("| " + " | ".join([
            r["features"], r["clf"], cv, _fmt(r.get("test_accuracy"), 4),
            _fmt(r.get("test_accuracy_no_leaks"), 4), _fmt(r.get("test_macro_f1"), 4),
            _fmt(r.get("fit_seconds"), 1), _fmt(r.get("predict_ms_per_image"), 3),
            str(r.get("best_params", "")).replace("|", "\\|"),
            str(r.get("status", "")) + (f" ({r['convergence_warnings']} convergence warnings)" if warned else ""),
        ]) + " |")
    if limit is not None and len(rows) > limit:
        lines.append(f"({len(rows) - limit} more rows)")
    if rows:
        lines.append(f"\nRanking: {SELECTION_RULE}.")
    leaky = [r for r in rows if not math.isnan(number(r.get("test_accuracy_no_leaks")))
             and number(r.get("test_accuracy_no_leaks")) != number(r.get("test_accuracy"))]
    if leaky:
        lines.append(f"\nwarning: test images with a near-duplicate in train/val change the test accuracy of "
                     f"{len(leaky)} rows; 'test acc. no leaks' leaves them out (audit/duplicates.csv)")
    return "\n".join(lines) + "\n"
