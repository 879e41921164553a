"""Grid-search worker processes die with a killed fit/compare (no orphans working for minutes)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

SCRIPT = """
import numpy as np
from sklearn.pipeline import make_pipeline
from featurepipe.fit import search
from slow_estimator import MarkedSlowClassifier
X = np.random.default_rng(0).normal(size=(40, 3)); y = np.arange(40) % 2
search(X=X, y=y, pipeline=make_pipeline(MarkedSlowClassifier()), grid={"markedslowclassifier__C": [1, 2]},
       cv=2, n_jobs=2, seed=0)
"""


def _wait_for_markers(folder, n, proc):
    import time

    deadline = time.monotonic() + 240  # a bound so a broken run cannot hang the suite
    while len(list(folder.iterdir())) < n:
        assert proc.poll() is None, "the search ended before its workers started"
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.2)
    return [int(p.name) for p in folder.iterdir()]


def _workers_left_by_a_killed(script, tmp_path, **env):
    """Start ``script`` (its two workers write marker files), kill -9 it once both run; the workers
    still alive 30 s later (each is killed afterwards whatever happens)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SLOW_MARKERS=str(markers), **env,
               PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        pids = _wait_for_markers(markers, 2, proc)
        workers = [psutil.Process(pid) for pid in pids if pid != proc.pid]
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return psutil.wait_procs(workers, timeout=30)[1]
    finally:
        proc.kill()
        for pid in [int(p.name) for p in markers.iterdir()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_loky_workers_die_with_a_killed_search(tmp_path):
    alive = _workers_left_by_a_killed(SCRIPT, tmp_path)
    assert not alive, f"workers outlived the killed search: {alive}"


def test_die_with_parent_kills_a_child_whose_parent_is_already_gone():
    code = "import os; from featurepipe.children import die_with_parent; die_with_parent(os.getppid() + 10**8); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.returncode == -signal.SIGKILL and "alive" not in out.stdout


AUDIT_SCRIPT = """
import numpy as np
from sklearn.pipeline import make_pipeline
import featurepipe.audit as audit
from featurefiles import separable, write_features
from slow_estimator import MarkedSlowClassifier
audit._logreg = lambda n_samples, n_features, seed, C=None: make_pipeline(MarkedSlowClassifier())
X, y, paths, split = separable(n_per_class=12, dim=8)
f = write_features("{root}/feats/synth/alpha.h5", X, y, paths, split)
audit.audit([f], n_jobs=2, seeds=1)
"""


def test_audit_workers_die_with_a_killed_audit(tmp_path):
    """kill -9 of audit while its cross-validation workers fit: they go too (issue 28, item 8)."""
    alive = _workers_left_by_a_killed(AUDIT_SCRIPT.format(root=tmp_path), tmp_path,
                                      FEATUREPIPE_MODELS=str(tmp_path / "models"))
    assert not alive, f"audit workers outlived the killed audit: {alive}"
