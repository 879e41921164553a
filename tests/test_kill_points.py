"""kill -9 at many moments of a full or incremental run, then a change to the folder and a re-run:
the file equals a clean run's. Each killed run is a subprocess (tests/kill_child.py) that kills
itself at its N-th write event, so the moments are exact and nothing waits on a clock."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import COLORS, make_dataset, make_image
from featurepipe.extract import extract
from featurepipe.store import load

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(preprocess="scale", quiet=True, verify=0, chunk_size=2, batch_size=2, engine="tf")
# Event numbers (two per write: before, after). Full run, 8 images in 4 parts: 1-8 parts,
# 9-16 rows, 17-18 commit, 19-20 removing the parts, 21-22 the latest pointer. Incremental run,
# 4 new images in 2 parts: 1-4 parts, 5-10 kept and new rows, 11-12 commit, 13-14 removing parts.
FULL_KILLS = (3, 12, 18)
INCREMENTAL_KILLS = (2, 8, 12)


def _initial(root):
    """train/test given by the layout, so a re-run's splits cannot depend on what was killed."""
    make_dataset(root / "train", n_per_class=3, classes=("red", "blue"))
    make_dataset(root / "test", n_per_class=1, classes=("red", "blue"), start=10)
    return root


def _grow(root):
    make_dataset(root / "train", n_per_class=2, classes=("red", "blue"), start=3)


def _change(root):
    """What a user does between the killed run and the re-run: delete, add, edit.

    The deleted image sorts before the images an incremental run adds and the others after them,
    so the first chunk of the re-run holds the same images at shifted index positions.
    """
    os.unlink(root / "train" / "blue" / "img_000.png")
    make_image(root / "train" / "red" / "img_050.png", COLORS["red"], seed=50)
    make_image(root / "train" / "red" / "img_000.png", COLORS["green"], seed=7)   # edited in place


def _killed_runs(runs, backbone, options=RUN):
    """Run each ``{"kill_at", "data", "out"}`` as an extract process that kills itself (all at
    once: the processes mostly import); return which were killed."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_child.py"),
                               json.dumps({**run, "backbones": [backbone], "options": options})],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for run in runs]
    try:
        return [proc.wait(timeout=300) == -signal.SIGKILL for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _assert_same(path, ref_path):
    a, b = load(path), load(ref_path)
    assert list(a.paths) == list(b.paths)
    assert list(a.split) == list(b.split) and list(a.sha1) == list(b.sha1)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_allclose(a.X, b.X, atol=1e-6, rtol=0)
    assert a.skipped == b.skipped


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
def test_kill_9_at_many_moments_then_change_and_rerun_equals_a_clean_run(tmp_path, tiny_model_path,
                                                                        incremental):
    backbone = f"file:{tiny_model_path}"
    template = _initial(tmp_path / "template")
    clean_data = shutil.copytree(template, tmp_path / "clean")
    if incremental:
        _grow(clean_data)
    _change(clean_data)
    [clean] = extract(clean_data, [backbone], out=tmp_path / "clean_out", **RUN)
    kills = INCREMENTAL_KILLS if incremental else FULL_KILLS
    runs = []
    for kill_at in kills:
        data = shutil.copytree(template, tmp_path / f"data{kill_at}")
        if incremental:
            extract(data, [backbone], out=tmp_path / f"out{kill_at}", **RUN)
            _grow(data)
        runs.append({"kill_at": kill_at, "data": str(data), "out": str(tmp_path / f"out{kill_at}")})
    assert _killed_runs(runs, backbone) == [True] * len(kills)   # each moment was reached
    for run in runs:
        _change(Path(run["data"]))
        [result] = extract(run["data"], [backbone], out=run["out"], **RUN)
        _assert_same(result.path, clean.path)
        assert not list(Path(run["out"]).glob(".*.parts"))


# Two layers, 8 images in 4 chunks: 1-4 both parts folders' settings, 5-20 both files' parts, 21-28
# the first file's rows, 29-30 its commit, 31-32 removing its parts (32: that file is complete, the
# other has only its parts).
LAYER_KILLS = (9, 32)


def test_kill_9_with_several_layers_then_change_and_rerun_equals_a_clean_run(tmp_path, tiny_model_path):
    backbone = f"file:{tiny_model_path}"
    options = {**RUN, "layer": ["conv_b", "pool_a"]}
    template = _initial(tmp_path / "template")
    clean_data = shutil.copytree(template, tmp_path / "clean")
    _change(clean_data)
    clean = extract(clean_data, [backbone], out=tmp_path / "clean_out", **options)
    runs = [{"kill_at": k, "data": str(shutil.copytree(template, tmp_path / f"data{k}")),
             "out": str(tmp_path / f"out{k}")} for k in LAYER_KILLS]
    assert _killed_runs(runs, backbone, options) == [True] * len(LAYER_KILLS)
    assert (Path(runs[1]["out"]) / "tiny@conv_b.h5").exists()
    assert not (Path(runs[1]["out"]) / "tiny@pool_a.h5").exists()
    for run in runs:
        _change(Path(run["data"]))
        results = extract(run["data"], [backbone], out=run["out"], **options)
        for result, ref in zip(results, clean):
            assert result.path.name == ref.path.name
            _assert_same(result.path, ref.path)
        assert not list(Path(run["out"]).glob(".*.parts"))
