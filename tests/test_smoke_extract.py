import h5py
import numpy as np

from featurepipe.extract import extract
from featurepipe.store import load


def test_extract_tiny_model_writes_contract(tiny_data, tiny_model_path, tmp_path):
    out = tmp_path / "feats"
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=out, preprocess="scale", quiet=True)
    f = load(result.path)
    assert f.X.shape == (18, 16) and f.X.dtype == np.float32
    assert f.class_names == ["blue", "green", "red"]
    assert list(f.paths) == sorted(f.paths)
    assert set(f.split) == {"train", "test"}
    with h5py.File(result.path) as h:
        assert h.attrs["preprocess"] == "scale" and h.attrs["image_size"] == 32
