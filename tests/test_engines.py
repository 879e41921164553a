"""Forward-pass engines: LiteRT agrees with TF, its conversion is cached, auto picks and falls back."""

import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import featurepipe.engines as engines
from featurepipe.backbones import get_backbone, make_spec
from featurepipe.engines import ENGINES, FeatureModel, make_engine, remembered_choice, tflite_path
from featurepipe.errors import UsageError
from featurepipe.extract import extract

from conftest import FLOWERS, needs_shared


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_feature_model(tiny_model_path, engine, pooling="avg"):
    backbone = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    spec, resolved = make_spec(backbone, pooling=pooling)
    return FeatureModel(backbone, spec, resolved, engine=engine)


def random_images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_every_engine_agrees_with_tf_on_tiny_model(tiny_model_path):
    images = random_images(5, 32)
    reference = tiny_feature_model(tiny_model_path, "tf")(images)
    assert reference.shape == (5, 16) and np.abs(reference).max() > 0
    for name in ENGINES:
        model = tiny_feature_model(tiny_model_path, name)
        got = model(images)
        assert model.engine.name == name
        assert got.dtype == np.float32 and got.shape == reference.shape
        assert relative_error(got, reference) < 1e-4
        # batch sizes change between calls (a short last batch) without re-planning errors
        assert relative_error(model(images[:2]), reference[:2]) < 1e-4


def test_litert_split_over_interpreters_keeps_row_order(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    model = tiny_feature_model(tiny_model_path, "tf")
    images = random_images(7, 32, seed=3)
    source = engines.ModelSource(lambda: engines.pixel_model(model.backbone, model.spec, model.resolved))
    serial = engines.LiteRTEngine(source, model.spec, parallel=1).run(images)
    split = engines.LiteRTEngine(source, model.spec, parallel=3).run(images)
    assert len({row.tobytes() for row in serial}) == 7  # distinct rows, so a shuffle would show
    np.testing.assert_array_equal(split, serial)
    assert relative_error(split, model(images)) < 1e-4


@needs_shared
def test_litert_agrees_with_tf_on_squeezenet():
    from featurepipe.reader import load_image

    files = sorted(FLOWERS.glob("*/*.jpg"))[::400][:6]
    backbone = get_backbone("squeezenet")
    spec, resolved = make_spec(backbone)
    images = np.stack([load_image(str(f), spec.image_size)[0] for f in files])
    tf_features = FeatureModel(backbone, spec, resolved, engine="tf")(images)
    lite = FeatureModel(backbone, spec, resolved, engine="litert")
    lite_features = lite(images)
    assert lite.engine.name == "litert" and lite_features.shape == (len(files), 512)
    assert relative_error(lite_features, tf_features) < 1e-4


def test_litert_conversion_is_cached_and_reused(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    images = random_images(3, 32)
    first = tiny_feature_model(tiny_model_path, "litert")
    expected = first(images)
    path = tflite_path(first.spec)
    assert path.is_file() and path.parent.parent == tmp_path / "cache"

    def fail(*args, **kwargs):
        raise AssertionError("converted or built again")

    monkeypatch.setattr(engines, "convert_to_tflite", fail)
    monkeypatch.setattr(engines, "build_feature_model", fail)  # a cached model needs no Keras model
    second = tiny_feature_model(tiny_model_path, "litert")
    got = second(images)
    np.testing.assert_array_equal(got, expected)
    # other settings are another cache entry
    assert tflite_path(tiny_feature_model(tiny_model_path, "litert", pooling="max").spec) != path


def test_auto_times_once_then_remembers(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    model = tiny_feature_model(tiny_model_path, "auto")
    chosen = model.engine.name
    record = remembered_choice(model.spec)
    assert chosen in ENGINES and record["engine"] == chosen
    assert set(record["images_per_second"]) == {"tf", "litert"}
    rates = record["images_per_second"]
    assert chosen == ("tf" if rates["tf"] > engines.TF_MARGIN * rates["litert"] else "litert")

    def fail(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(engines, "time_engines", fail)
    assert tiny_feature_model(tiny_model_path, "auto").engine.name == chosen


def hide_litert(monkeypatch):
    """Make ``import ai_edge_litert`` fail, as when the extra is not installed."""
    for name in [m for m in sys.modules if m.startswith("ai_edge_litert")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)


def test_auto_falls_back_to_tf_without_litert(tiny_model_path, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    hide_litert(monkeypatch)
    assert not engines.litert_available()
    assert tiny_feature_model(tiny_model_path, "auto").engine.name == "tf"
    with pytest.raises(UsageError, match=r"featurepipe\[litert\]"):
        tiny_feature_model(tiny_model_path, "litert").engine
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "f",
                       preprocess="scale", quiet=True, engine="auto")
    with h5py.File(result.path) as f:
        assert f.attrs["engine"] == "tf"


def test_extract_records_the_engine_really_used(tiny_model_path, tiny_data, tmp_path):
    for engine in ("litert", "auto"):
        [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / engine,
                           preprocess="scale", quiet=True, engine=engine)
        with h5py.File(result.path) as f:
            recorded = f.attrs["engine"]
        assert recorded == (engine if engine != "auto" else
                            remembered_choice(tiny_feature_model(tiny_model_path, "tf").spec)["engine"])
    a = h5py.File(tmp_path / "litert" / "tiny.h5")["features"][()]
    b = h5py.File(tmp_path / "auto" / "tiny.h5")["features"][()]
    assert relative_error(a, b) < 1e-4


def test_unknown_engine_is_a_usage_error(tiny_model_path):
    with pytest.raises(UsageError, match="unknown engine 'onnx'"):
        tiny_feature_model(tiny_model_path, "onnx")
    with pytest.raises(UsageError, match="auto, tf, litert"):
        make_engine("onnx", lambda: None, None)


def test_network_errors_in_decode_threads_stop_the_run(tiny_model_path, tiny_data, tmp_path, monkeypatch):
    """The litert engine runs in extract's decode threads; its failure must not pass for bad images."""
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))

    def broken(self, image):
        raise RuntimeError("interpreter failed")

    monkeypatch.setattr(engines.LiteRTEngine, "run_one", broken)
    with pytest.raises(RuntimeError, match="interpreter failed"):
        extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "f", preprocess="scale",
                quiet=True, engine="litert")


def test_interpreters_made_in_many_threads_leave_stderr_alone(tiny_model_path, tmp_path, monkeypatch):
    """Each decode thread makes its own interpreter; hiding LiteRT's INFO line must not lose stderr."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    real_class = engines._litert_interpreter()

    class SlowToPlan(real_class):  # widen the window in which fd 2 is redirected
        def allocate_tensors(self):
            time.sleep(0.05)
            return super().allocate_tensors()

    monkeypatch.setattr(engines, "_litert_interpreter", lambda: SlowToPlan)
    stderr = open(os.dup(2), "w")  # a real file descriptor (pytest's capture has none)
    monkeypatch.setattr(sys, "stderr", stderr)
    model = tiny_feature_model(tiny_model_path, "litert")
    images = random_images(16, 32)
    before = os.fstat(stderr.fileno())
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(model.one, images))
    after = os.fstat(stderr.fileno())
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert relative_error(np.stack(rows), model(images)) < 1e-4
