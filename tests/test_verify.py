"""verify: re-extracted rows must match the stored features; mismatches are named, exit 1."""

import h5py
import numpy as np
import pytest

import featurepipe.engines as engines
from featurepipe.cli import run_main
from featurepipe.errors import DataError
from featurepipe.extract import extract
from featurepipe.verify import main, verify


@pytest.fixture
def tiny_file(tiny_data, tiny_model_path, tmp_path):
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "feats",
                       preprocess="scale", quiet=True, engine="tf")
    return result.path


def test_verify_passes_on_a_fresh_file(tiny_file, capsys):
    result = verify(tiny_file, sample=0)
    assert result.ok and len(result.rows) == 18
    assert np.nanmax(result.errors) < 1e-4
    assert run_main(main, [str(tiny_file), "--sample", "5"]) == 0
    assert "5 rows re-extracted, ok" in capsys.readouterr().err


def test_verify_names_swapped_rows_and_exits_non_zero(tiny_file, capsys):
    with h5py.File(tiny_file, "r+") as f:
        X = f["features"][()]
        f["features"][3], f["features"][12] = X[12], X[3]   # features no longer line up with paths
        paths = f["paths"].asstr()[()]
    result = verify(tiny_file, sample=0)
    assert [m.row for m in result.mismatches] == [3, 12]
    assert run_main(main, [str(tiny_file), "--sample", "0"]) == 1
    err = capsys.readouterr().err
    assert f"row 3 ({paths[3]})" in err and f"row 12 ({paths[12]})" in err and "2 MISMATCHED" in err


def test_verify_names_an_edited_image(tiny_file, tiny_data):
    from conftest import make_image

    with h5py.File(tiny_file) as f:
        path = f["paths"].asstr()[5]
    make_image(tiny_data / path, (255, 255, 0), seed=99)
    [mismatch] = verify(tiny_file, sample=0).mismatches
    assert mismatch.row == 5 and "changed since extraction" in mismatch.reason


def test_extract_verifies_at_the_end_and_catches_engine_drift(tiny_data, tiny_model_path, tmp_path,
                                                                monkeypatch):
    real_images = engines.LiteRTEngine._run_images  # under both run (batches) and run_one (extract)
    monkeypatch.setattr(engines.LiteRTEngine, "_run_images", lambda self, images: real_images(self, images) * 1.01)
    args = dict(preprocess="scale", quiet=True, engine="litert")
    with pytest.raises(DataError, match="MISMATCHED.*row "):
        extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "a", **args)
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "b", verify=0, **args)
    assert result.n_rows == 18


def test_verify_refuses_random_weights(tmp_path):
    # a random-weights network cannot be rebuilt identically: say so instead of reporting drift
    text = h5py.string_dtype()
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["features"], f["labels"] = np.zeros((1, 4), np.float32), np.zeros(1, np.int32)
        for name, value in (("paths", "a"), ("split", "train"), ("class_names", "a")):
            f.create_dataset(name, data=[value], dtype=text)
        f.attrs.update(backbone="squeezenet", preprocess="caffe", image_size=32, weights_sha256="")
    with pytest.raises(DataError, match="random weights"):
        verify(tmp_path / "x.h5")


def test_verify_with_a_missing_image_folder_is_a_one_line_error(tiny_file, tmp_path, capsys):
    assert run_main(main, [str(tiny_file), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
