"""Every CSV featurepipe writes escapes cells a spreadsheet would run as formulas."""

import csv

import pytest

from featurepipe.audit import audit
from featurepipe.compare import compare
from featurepipe.csvcells import escape, unescape
from featurepipe.results import read_results

from featurefiles import write_features
from test_audit import planted

FORMULAS = ["=1+2", "+cmd", "-x|calc", "@SUM(A1)", "\tx", "\rx", "'quoted"]


def _raw_cells(path):
    with open(path, newline="") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


def _unsafe(cells):
    return [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r")) and not _number(c)]


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_escape_round_trips_and_leaves_numbers():
    for text in FORMULAS + ["plain", "", "a=b"]:
        assert unescape(escape(text)) == text
        assert not _unsafe([escape(text)])
    assert escape("-0.25") == "-0.25" and escape("=1+2") == "'=1+2"


def test_results_and_audit_csvs_escape_names_from_data(tmp_path):
    X, y, paths, split, _ = planted()
    paths = [f"=HYPERLINK(x)/{p}" for p in paths]
    f = write_features(tmp_path / "feats" / "synth" / "@feat.h5", X, y, paths, split,
                       class_names=["=a", "+b", "-c"])
    compare([f], ["logreg"], cv=3, n_jobs=1, plots=False, report=False)
    audit([f], seeds=1, n_jobs=1)
    folder = tmp_path / "home" / "models" / "synth"
    for name in ("results.csv", "audit/suspects.csv", "audit/duplicates.csv"):
        cells = _raw_cells(folder / name)
        assert len(cells) > 10 and not _unsafe(cells), name
    assert "'=HYPERLINK(x)/a/img_001.jpg" in _raw_cells(folder / "audit/duplicates.csv")
    assert [r["features"] for r in read_results(folder)] == ["@feat"]  # read back as written
    assert audit([f], seeds=1, n_jobs=1, reuse=True).duplicates[0].path_a.startswith("=HYPERLINK")

