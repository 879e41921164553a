"""Where outputs go: never inside the input tree, never over another data set's files; disk
full and stale temporary files leave finished work intact."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset
from featurepipe import paths
from featurepipe.cli import run_main
from featurepipe.errors import UsageError
from featurepipe.extract import extract, main
from featurepipe.store import load


def _run(data, model_path, out=None, **kw):
    kw.setdefault("preprocess", "scale")
    kw.setdefault("quiet", True)
    kw.setdefault("verify", 0)
    return extract(data, [f"file:{model_path}"], out=out, **kw)[0]


def test_is_inside():
    assert paths.is_inside("a/b/c", "a/b") and paths.is_inside("a/b", "a/b")
    assert not paths.is_inside("a/bc", "a/b") and not paths.is_inside("a", "a/b")


def test_default_output_inside_the_image_folder_goes_to_featurepipe_out(tmp_path, tiny_model_path,
                                                                      monkeypatch, capsys):
    make_dataset(tmp_path / "data", n_per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATUREPIPE_DATA", "data")  # the default: ./data, which is the image folder
    before = sorted(p for p in (tmp_path / "data").rglob("*"))
    code = run_main(main, ["--data", "data", "--backbone", f"file:{tiny_model_path}",
                           "--preprocess", "scale", "--quiet", "--no-verify"])
    assert code == 0
    written = tmp_path / "featurepipe-out" / "data" / "tiny.h5"
    assert load(written).class_names == ["blue", "green", "red"]
    assert sorted(p for p in (tmp_path / "data").rglob("*")) == before  # nothing new inside the images


def test_working_inside_the_image_folder_needs_out(tmp_path, tiny_model_path, monkeypatch, capsys):
    make_dataset(tmp_path / "data", n_per_class=2)
    monkeypatch.chdir(tmp_path / "data")
    monkeypatch.setenv("FEATUREPIPE_DATA", str(tmp_path / "data"))
    code = run_main(main, ["--data", ".", "--backbone", f"file:{tiny_model_path}",
                           "--preprocess", "scale", "--quiet", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err
    assert not (tmp_path / "data" / "featurepipe-out").exists() and not (tmp_path / "data" / "features").exists()
    result = _run(".", tiny_model_path, out=tmp_path / "elsewhere")
    assert load(result.path).class_names == ["blue", "green", "red"]


def test_explicit_out_inside_the_image_folder_is_refused(tiny_data, tiny_model_path):
    with pytest.raises(UsageError, match="inside the image folder"):
        _run(tiny_data, tiny_model_path, out=tiny_data / "red" / "features")
    assert not (tiny_data / "red" / "features").exists()


def test_two_data_sets_with_one_folder_name_never_share_a_feature_folder(tmp_path, tiny_model_path):
    a = make_dataset(tmp_path / "A" / "photos", n_per_class=2)
    b = make_dataset(tmp_path / "B" / "photos", n_per_class=3)
    first = _run(a, tiny_model_path)
    before = load(first.path)
    with pytest.raises(UsageError, match="another data set.*--out"):
        _run(b, tiny_model_path)
    with pytest.raises(UsageError, match="another data set"):
        extract(b, ["squeezenet"], quiet=True, verify=0)  # another backbone: same folder, refused too
    after = load(first.path)
    assert list(after.paths) == list(before.paths) and after.attrs["data_root"] == str(a.resolve())
    second = _run(b, tiny_model_path, out=tmp_path / "features-b")
    assert len(load(second.path)) == 9


def test_two_feature_folders_with_one_name_never_share_models(tmp_path):
    from featurefiles import separable, write_features
    from featurepipe.fit import fit

    X, y, rel, split = separable(dim=6)
    a = write_features(tmp_path / "A" / "photos" / "f.h5", X, y, rel, split)
    b = write_features(tmp_path / "B" / "photos" / "f.h5", X, y, rel, split)
    first = fit([a], "logreg", cv=2, n_jobs=1)
    assert Path(first.model).parent.name == "photos"
    with pytest.raises(UsageError, match="holds the models of the feature files in"):
        fit([b], "logreg", cv=2, n_jobs=1)
    assert Path(first.model).is_file()


DEAD_PID = 99_999_999  # above any pid_max: no such process


def _crash_before_the_file_is_written(monkeypatch):
    from featurepipe import extract as extract_module

    def crash(*args, **kwargs):
        raise RuntimeError("killed before assembling")

    monkeypatch.setattr(extract_module, "assemble", crash)


def test_a_rerun_after_a_kill_removes_leftovers_and_tells_the_truth(tiny_data, tiny_model_path, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        _crash_before_the_file_is_written(mp)
        with pytest.raises(RuntimeError, match="killed"):
            _run(tiny_data, tiny_model_path, out, engine="auto")
    parts = out / ".tiny.parts"
    stale = [out / f".tiny.h5.tmp-{DEAD_PID}", parts / f".part-x.npz.tmp-{DEAD_PID}"]
    live = out / f".tiny.h5.tmp-{os.getpid()}-other"  # a live writer's file is never removed
    for path in stale + [live]:
        path.write_bytes(b"half written")
    with pytest.warns(UserWarning, match=f"removed 2 temporary files left by a killed run, e.g. .tiny.h5.tmp-{DEAD_PID}"):
        result = _run(tiny_data, tiny_model_path, out, engine="auto", quiet=False)
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stale) and live.exists()
    assert result.n_extracted == 18 and result.n_resumed == 18
    assert "0 extracted, 18 from an interrupted run" in err
    assert load(result.path).attrs["engine"] in ("tf", "litert")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_the_file_keeps_the_old_one(tmp_path, tiny_model_path, monkeypatch, capsys):
    import h5py

    data = make_dataset(tmp_path / "d", n_per_class=2)
    out = tmp_path / "out"
    before = load(_run(data, tiny_model_path, out).path)
    make_dataset(data, n_per_class=2, start=2)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _disk_full)
    code = run_main(main, ["--data", str(data), "--out", str(out), "--backbone", f"file:{tiny_model_path}",
                           "--preprocess", "scale", "--quiet", "--no-verify"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no space left" in err and str(out) in err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    after = load(out / "tiny.h5")
    assert list(after.paths) == list(before.paths)
    np.testing.assert_array_equal(after.X, before.X)
    resumed = _run(data, tiny_model_path, out)  # the parts were kept: nothing is extracted twice
    assert resumed.n_rows == 12 and resumed.n_resumed == 6


def test_too_little_free_space_is_refused_before_writing(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    from collections import namedtuple

    from featurepipe import store
    from featurepipe.store import DiskFullError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 1000))
    with pytest.raises(DiskFullError, match="MB are free"):
        _run(tiny_data, tiny_model_path, tmp_path / "out")
    assert not [p.name for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_disk_full_while_saving_parts_is_one_line(tiny_data, tiny_model_path, tmp_path, monkeypatch, capsys):
    from featurepipe import store

    monkeypatch.setattr(store.np, "savez", lambda fh, **arrays: fh.write(b"PK") and _disk_full())
    out = tmp_path / "out"
    code = run_main(main, ["--data", str(tiny_data), "--out", str(out), "--backbone", f"file:{tiny_model_path}",
                           "--preprocess", "scale", "--quiet", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left" in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
