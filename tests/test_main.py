"""The ``featurepipe <stage>`` command dispatches to each stage's ``main``."""

import subprocess
import sys

import pytest

from featurepipe import __main__ as entry


def test_help_lists_every_stage(capsys):
    assert entry.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in entry.STAGES:
        assert stage in out


def test_unknown_stage_is_one_line_and_exit_2(capsys):
    assert entry.main(["extrakt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "extract" in err[0]


def test_stage_gets_the_remaining_arguments(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 7

    import featurepipe.verify as verify
    monkeypatch.setattr(verify, "main", fake_main)
    assert entry.main(["verify", "x.h5", "--sample", "3"]) == 7
    assert seen["argv"] == ["x.h5", "--sample", "3"]


@pytest.mark.parametrize("stage", sorted(entry.STAGES))
def test_every_stage_module_has_main(stage):
    import importlib

    module = importlib.import_module(entry.STAGES[stage][0])
    assert callable(module.main)


def test_python_dash_m_featurepipe_runs_a_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "featurepipe", "verify", str(tmp_path / "none.h5")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr


def test_every_stage_prints_warnings_as_one_line(capsys):
    import warnings

    from featurepipe.cli import run_main

    def stage(argv):
        warnings.warn("something to know\nacross lines? no: one line per warning")
        return 0

    assert run_main(stage, []) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: something to know") and "UserWarning" not in err
