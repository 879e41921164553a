"""The cached LiteRT conversion is checked against the digest recorded at conversion."""

import numpy as np
import pytest

from featurepipe.backbones import get_backbone
from featurepipe.settings import make_spec
from featurepipe.engines import FeatureModel, litert_available, tflite_path

pytestmark = pytest.mark.skipif(not litert_available(), reason="LiteRT (ai-edge-litert) not installed")


def _model(tiny_model_path, engine, pooling="avg"):
    backbone = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    spec, resolved = make_spec(backbone, pooling=pooling)
    return FeatureModel(backbone, spec, resolved, engine=engine)


def _images():
    return np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))


def _tamper_and_reload(tiny_model_path, tamper):
    reference = _model(tiny_model_path, "tf")(_images())
    _model(tiny_model_path, "litert")(_images())  # converts and caches
    path = tflite_path(_model(tiny_model_path, "tf").spec)
    assert path.is_file()
    tamper(path)
    with pytest.warns(UserWarning, match=f"cached LiteRT model '{path}'.*converting it again"):
        got = _model(tiny_model_path, "litert")(_images())
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    return path


def test_a_planted_model_in_the_cache_is_replaced(tiny_model_path, private_cache):
    planted = tflite_path(_model(tiny_model_path, "tf", pooling="max").spec)
    _model(tiny_model_path, "litert", pooling="max")(_images())  # a valid model, other numbers
    _tamper_and_reload(tiny_model_path, lambda path: path.write_bytes(planted.read_bytes()))


def test_a_truncated_model_in_the_cache_is_rebuilt(tiny_model_path, private_cache):
    def truncate(path):
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])

    path = _tamper_and_reload(tiny_model_path, truncate)
    size = path.stat().st_size
    _model(tiny_model_path, "litert")(_images())  # intact now: no warning, not rebuilt
    assert path.stat().st_size == size
