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


def test_default_output_inside_the_image_folder_is_refused(tmp_path, tiny_model_path, monkeypatch, capsys):
    make_dataset(tmp_path / "data", n_per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATUREPIPE_DATA", "data")  # the default: ./data, which is the image folder
    code = run_main(main, ["--data", "data", "--backbone", f"file:{tiny_model_path}",
                           "--preprocess", "scale", "--quiet", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err
    assert not (tmp_path / "data" / "features").exists()
    result = _run("data", tiny_model_path, out=tmp_path / "elsewhere")
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
