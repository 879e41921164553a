"""Dask scale-out: sharded extraction equals a local run, survives a killed worker, resumes.

One LocalCluster (2 worker processes, 1 thread each) is shared by the module: starting it and
importing TensorFlow in its workers is most of the cost.
"""

import functools
import os
import signal
import sys
from pathlib import Path

import cloudpickle
import h5py
import numpy as np
import pytest

import featurepipe.assemble as assemble_module
import featurepipe.chunks as chunks_module
from featurepipe.distributed import joblib_backend, parse_address
from featurepipe.errors import UsageError
from featurepipe.extract import extract, main
from featurepipe.store import load

from conftest import make_dataset

# Functions defined here run on the workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = dict(chunk_size=4, batch_size=3)       # 25 images -> 7 chunks, batches of 3 + 1
ORIGINAL_CHUNK = chunks_module.extract_chunk
TIMESTAMPS = {"created", "updated"}


def _warm():
    import tensorflow  # noqa: F401

    import featurepipe.engines  # noqa: F401


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster, fire_and_forget

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as local:
        with Client(local, set_as_default=False) as client:
            # TF is imported on the workers while the client makes the reference file.
            for worker in local.scheduler_info["workers"]:
                fire_and_forget(client.submit(_warm, workers=[worker], pure=False))
            yield local.scheduler_address


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_path):
    """The tiny dataset (with one unreadable file) and its single-process feature file."""
    root = tmp_path_factory.mktemp("dask")
    data = make_dataset(root / "colors", n_per_class=8)
    (data / "red" / "empty.jpg").write_bytes(b"")
    backbone = f"file:{tiny_model_path}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREPIPE_DATA", str(root / "home"))
        [ref] = extract(data, [backbone], out=root / "local", preprocess="scale", quiet=True, **CHUNK)
    return data, backbone, ref.path


def _assert_same_file(path, ref_path):
    a, b = load(path), load(ref_path)
    assert list(a.paths) == list(b.paths)
    for name in ("y", "split", "sha1", "file_size", "mtime_ns"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.skipped == b.skipped == [("red/empty.jpg", "empty file (0 bytes)")]
    np.testing.assert_allclose(a.X, b.X, atol=1e-5, rtol=0)
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in TIMESTAMPS}  # noqa: E731
    assert strip(a.attrs) == strip(b.attrs)
    with h5py.File(path) as f:
        assert f["features"].shape == (24, 16)


def _logged_chunk(members, stream, model, batch_size, bar, *, log, kill_marker=None, fail_at=None):
    """``extract_chunk`` that logs start/end (first path) per chunk, and can die or fail on request."""
    with open(log, "a") as fh:
        fh.write(f"start {members[0]} {os.getpid()}\n")
    if kill_marker is not None:
        try:
            os.close(os.open(kill_marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)      # the first chunk's worker dies mid-chunk
    if fail_at is not None and fail_at in members:
        raise RuntimeError(f"chunk with {fail_at} fails")
    part = ORIGINAL_CHUNK(members, stream, model, batch_size, bar)
    with open(log, "a") as fh:
        fh.write(f"done {members[0]} {os.getpid()}\n")
    return part


def _log(path, kind):
    lines = Path(path).read_text().split() if Path(path).exists() else []
    rows = [lines[i:i + 3] for i in range(0, len(lines), 3)]
    return [(first, int(pid)) for k, first, pid in rows if k == kind]


def _patch_chunk(monkeypatch, tmp_path, **kwargs):
    log = tmp_path / "chunks.log"
    monkeypatch.setattr(chunks_module, "extract_chunk",
                        functools.partial(_logged_chunk, log=str(log), **kwargs))
    return log


def test_parse_address():
    assert parse_address("local:3") == ("local", 3)
    assert parse_address("local") == ("local", os.cpu_count())
    assert parse_address("tcp://10.0.0.5:8786") == ("remote", "tcp://10.0.0.5:8786")
    assert parse_address("sched:8786") == ("remote", "tcp://sched:8786")
    for bad in ("local:0", "local:x", "somewhere"):
        with pytest.raises(UsageError, match="--dask"):
            parse_address(bad)


def test_cli_bad_dask_address_is_one_line(tiny, tmp_path, capsys):
    from featurepipe.cli import run_main

    data, backbone, _ = tiny
    code = run_main(main, ["--data", str(data), "--backbone", backbone, "--preprocess", "scale",
                           "--out", str(tmp_path / "o"), "--dask", "local:0", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "local:0" in err


def test_sharded_extraction_equals_single_process(cluster, tiny, tmp_path, monkeypatch, capsys):
    data, backbone, ref_path = tiny
    log = _patch_chunk(monkeypatch, tmp_path)

    def guess(model):
        raise AssertionError("the engine attribute must be the one the workers returned, not a guess")

    monkeypatch.setattr(assemble_module, "_engine_without_building", guess)
    [result] = extract(data, [backbone], out=tmp_path / "dask", preprocess="scale", dask=cluster,
                       **CHUNK)
    _assert_same_file(result.path, ref_path)  # the engine attribute included
    assert result.n_extracted == 24 and result.n_skipped == 1
    done = _log(log, "done")
    assert len(done) == 7 and os.getpid() not in {pid for _, pid in done}   # all on workers
    assert "dask: 2 workers" in capsys.readouterr().err
    assert not (tmp_path / "dask" / ".tiny.parts").exists()


def test_failed_shard_rerun_redoes_only_it(cluster, tiny, tmp_path, monkeypatch):
    data, backbone, ref_path = tiny
    out = tmp_path / "dask"
    log = _patch_chunk(monkeypatch, tmp_path, fail_at="green/img_001.png")  # in the third chunk
    with pytest.raises(RuntimeError, match="fails"):
        extract(data, [backbone], out=out, preprocess="scale", dask=cluster, quiet=True, **CHUNK)
    assert len(list((out / ".tiny.parts").glob("part-*.npz"))) == 6     # the others were kept
    log.unlink()
    log = _patch_chunk(monkeypatch, tmp_path)
    [result] = extract(data, [backbone], out=out, preprocess="scale", dask=cluster, quiet=True, **CHUNK)
    _assert_same_file(result.path, ref_path)
    [(first, _)] = _log(log, "done")
    assert first == "green/img_000.png"


def test_killed_worker_redoes_only_its_chunk(cluster, tiny, tmp_path, monkeypatch):
    data, backbone, ref_path = tiny
    log = _patch_chunk(monkeypatch, tmp_path, kill_marker=str(tmp_path / "killed"))
    [result] = extract(data, [backbone], out=tmp_path / "dask", preprocess="scale", dask=cluster,
                       quiet=True, **CHUNK)
    _assert_same_file(result.path, ref_path)
    assert (tmp_path / "killed").exists()
    started, done = _log(log, "start"), _log(log, "done")
    assert sorted(first for first, _ in done) == sorted({first for first, _ in done})   # once each
    assert len(done) == 7 and len(started) == 8          # the killed chunk was started twice


def test_joblib_backend_grid_search_same_results(cluster):
    from distributed import get_client, get_task_stream
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import LinearSVC

    X, y = make_classification(n_samples=120, n_features=8, random_state=0)

    def search():
        grid = GridSearchCV(LinearSVC(random_state=0), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3, n_jobs=2)
        return grid.fit(X, y)

    local = search()
    with joblib_backend(cluster) as client:
        assert get_client() is client
        with get_task_stream(client) as tasks:
            remote = search()
        assert len(tasks.data) >= 1   # the folds ran on Dask (joblib batches them into fewer tasks)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"],
                                  local.cv_results_["mean_test_score"])


def test_local_session_starts_and_closes_a_cluster():
    from featurepipe.distributed import session

    with session("local:1") as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [1]
        assert client.submit(sum, [1, 2]).result() == 3
    assert client.status == "closed"


def test_compare_on_dask_gives_the_same_table(cluster, tmp_path):
    compare = pytest.importorskip("featurepipe.compare", reason="featurepipe.compare not merged yet").compare
    from featurefiles import two_files

    a, b = two_files(tmp_path / "feats")
    timing = {"fit_seconds", "predict_ms_per_image", "model_sha256"}  # the file holds its fit time

    def table(**kwargs):
        rows = compare([a, b], ["logreg", "knn"], cv=3, n_jobs=2, force=True, plots=False, **kwargs)
        # sorted by name: rows tied on CV are ranked by their (machine-dependent) fit time
        return sorted(({k: v for k, v in r.items() if k not in timing} for r in rows),
                      key=lambda r: (r["features"], r["clf"]))

    from distributed import Client, get_task_stream

    local = table()
    assert len(local) == 6
    with Client(cluster, set_as_default=False) as watcher, get_task_stream(client=watcher) as tasks:
        assert table(dask=cluster) == local
    assert len(tasks.data) >= 6 * 3                      # every search's folds ran on the workers


@pytest.mark.parametrize("clf", ["logreg", "svm-rbf"])
def test_fit_on_dask_equals_the_local_fit(cluster, tmp_path, monkeypatch, clf):
    # The search runs on a stratified subsample (scattered to the workers once) and, for svm-rbf,
    # on the bounded Nystroem variant: the same rows, scores and model as the local run.
    from featurepipe.fit import fit

    sys.path.insert(0, str(Path(__file__).parent))
    from featurefiles import separable, write_features

    monkeypatch.setenv("FEATUREPIPE_SEARCH_MAX_ROWS", "45")
    monkeypatch.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "30")
    X, y, paths, split = separable(n_per_class=30)
    f = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    local = fit([f], clf, cv=3, n_jobs=2, save=False)
    remote = fit([f], clf, cv=3, n_jobs=2, dask=cluster, save=False)
    assert "45-row subsample" in local.best_params
    for field in ("best_params", "cv_mean", "cv_std", "test_accuracy", "n_train", "status", "confusion"):
        assert getattr(remote, field) == getattr(local, field), field


def test_the_rows_scattered_for_one_search_stay_on_the_cluster_until_the_next_search_has_them(cluster):
    import time

    import joblib

    from featurepipe.distributed import session

    X, y = np.arange(4000, dtype=np.float32).reshape(1000, 4), np.arange(1000) % 2
    with session(cluster) as client:
        with joblib_backend(cluster, scatter=(X, y)):
            keys = {f.key for f in joblib.parallel.get_active_backend()[0].data_futures.values()}
        time.sleep(1.0)  # let a release, if one was sent, reach the scheduler
        assert keys <= set(client.who_has())  # still there between two searches of one session
        with joblib_backend(cluster, scatter=(X, y)):  # the next search: the same rows, the same keys
            again = {f.key for f in joblib.parallel.get_active_backend()[0].data_futures.values()}
            assert again == keys and keys <= set(client.who_has())
