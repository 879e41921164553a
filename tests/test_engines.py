"""Forward-pass engines: LiteRT agrees with TF, its conversion is cached, auto picks and falls back;
a new engine is one class and one registry entry."""

import dataclasses
import sys
import time

import h5py
import numpy as np
import pytest

import featurepipe.engines as engines
from featurepipe.engines import choice, litert
from featurepipe.engines import model as engine_model
from featurepipe.backbones import get_backbone
from featurepipe.settings import make_spec
from featurepipe.settings import with_layers
from featurepipe.engines import (ENGINES, Engine, EngineKind, FeatureModel, PerImageEngine, make_engine,
                                 pick_engine, remembered_choice, tflite_path)
from featurepipe.errors import FeaturepipeError, UsageError
from featurepipe.extract import extract
from featurepipe.extract import main as extract_main

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

    monkeypatch.setattr(litert, "convert_to_tflite", fail)
    monkeypatch.setattr(engine_model, "build_feature_model", fail)  # a cached model needs no Keras model
    second = tiny_feature_model(tiny_model_path, "litert")
    got = second(images)
    np.testing.assert_array_equal(got, expected)
    # other settings are another cache entry
    assert tflite_path(tiny_feature_model(tiny_model_path, "litert", pooling="max").spec) != path


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
    real_class = litert._litert_interpreter()

    class SlowToPlan(real_class):  # widen the window in which fd 2 is redirected
        def allocate_tensors(self):
            time.sleep(0.05)
            return super().allocate_tensors()

    monkeypatch.setattr(litert, "_litert_interpreter", lambda: SlowToPlan)
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


# --------------------------------------------------------------------------- protocol and registry


class EagerEngine:
    """A toy engine: the Keras pixel model called eagerly (no tf.function, no conversion)."""

    name = "toy"

    def __init__(self, model, spec=None):
        self.model = model.get()
        self.dtype = np.dtype(self.model.inputs[0].dtype)

    def run(self, batch):
        out = self.model(np.asarray(batch, dtype=self.dtype), training=False)
        if isinstance(out, (list, tuple)):
            return [np.asarray(o, dtype=np.float32) for o in out]
        return np.asarray(out, dtype=np.float32)


def register_toy(monkeypatch, **entry):
    """The one registry entry a new engine needs (``monkeypatch`` removes it after the test)."""
    kind = EngineKind(make=EagerEngine, available=lambda: True, description="Keras, eagerly")
    monkeypatch.setitem(ENGINES, "toy", dataclasses.replace(kind, **entry))


class FakeClock:
    """``perf_counter`` for the auto trial: time passes only when a timed engine runs."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        self.runs = []  # engine names, in the order they ran
        monkeypatch.setattr(choice, "perf_counter", lambda: self.now)

    def slow_down(self, monkeypatch, engine_class, seconds):
        """Each ``run`` of ``engine_class`` takes ``seconds(k)`` on this clock (k: its k-th run)."""
        real_run = engine_class.run
        count = []

        def run(engine, batch):
            self.now += seconds(len(count))
            count.append(1)
            self.runs.append(engine.name)
            return real_run(engine, batch)

        monkeypatch.setattr(engine_class, "run", run)


def test_built_engines_follow_the_protocol(tiny_model_path):
    per_image = {"tf": False, "litert": True}
    for name in ENGINES:
        model = tiny_feature_model(tiny_model_path, name)
        assert isinstance(model.engine, Engine) and model.engine.name == name
        assert isinstance(model.engine, PerImageEngine) == per_image[name] == model.per_image


def test_a_new_engine_is_one_class_and_one_registry_entry(tiny_model_path, tiny_data, tmp_path, monkeypatch):
    register_toy(monkeypatch)
    images = random_images(4, 32)
    reference = tiny_feature_model(tiny_model_path, "tf")(images)
    model = tiny_feature_model(tiny_model_path, "toy")
    assert model.engine_used is None  # nothing built yet
    assert relative_error(model(images), reference) < 1e-4
    assert model.engine_used == "toy" and not model.per_image
    source = engines.ModelSource(lambda: engines.pixel_model(model.backbone, model.spec, model.resolved))
    assert isinstance(make_engine("toy", source, model.spec), EagerEngine)
    # the CLI accepts it too, and the file records it
    assert extract_main(["--data", str(tiny_data), "--backbone", f"file:{tiny_model_path}", "--preprocess", "scale",
                         "--out", str(tmp_path / "f"), "--engine", "toy", "--quiet"]) == 0
    with h5py.File(tmp_path / "f" / "tiny.h5") as f:
        assert f.attrs["engine"] == "toy" and f["features"].shape == (18, 16)


def test_a_new_engine_gives_every_layer_of_a_multi_layer_model(tiny_model_path, monkeypatch):
    register_toy(monkeypatch)
    backbone = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    spec, resolved = make_spec(backbone)
    multi = with_layers(spec, ("conv_b", "conv_a"))
    images = random_images(3, 32)
    got = FeatureModel(backbone, multi, resolved, engine="toy")(images)
    want = FeatureModel(backbone, multi, resolved, engine="tf")(images)
    assert [g.shape for g in got] == [(3, 16), (3, 8)]
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-4


def test_auto_times_every_available_engine_interleaved_best_of_n(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    register_toy(monkeypatch)

    def never_built(model, spec):
        raise AssertionError("an unavailable engine was built")

    monkeypatch.setitem(ENGINES, "missing", EngineKind(make=never_built, available=lambda: False,
                                                       description="not installed"))
    clock = FakeClock(monkeypatch)
    clock.slow_down(monkeypatch, engines.TFEngine, lambda k: 2.0)
    clock.slow_down(monkeypatch, engines.LiteRTEngine, lambda k: 1.0)
    # slowest on every run but one: only the best of the timed runs counts (a mean would lose)
    clock.slow_down(monkeypatch, EagerEngine, lambda k: 0.5 if k == 3 else 9.0)
    model = tiny_feature_model(tiny_model_path, "auto")
    assert model.engine_used is None
    model(random_images(2, 32))
    assert model.engine_used == "toy"
    warm_up_and_rounds = ["tf", "litert", "toy"] * (1 + engines.TRIAL_ROUNDS)
    assert clock.runs[:len(warm_up_and_rounds)] == warm_up_and_rounds
    record = remembered_choice(model.spec)
    batch = engines.TRIAL_BATCH
    assert record["engine"] == "toy" and record["batch"] == batch
    assert record["images_per_second"] == {"tf": batch / 2.0, "litert": batch / 1.0, "toy": batch / 0.5}

    def fail(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(choice, "time_engines", fail)
    again = tiny_feature_model(tiny_model_path, "auto")
    again(random_images(1, 32))
    assert again.engine_used == "toy"


def test_a_newly_registered_engine_is_timed_although_a_choice_is_remembered(tiny_model_path, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    clock = FakeClock(monkeypatch)
    clock.slow_down(monkeypatch, engines.TFEngine, lambda k: 1.0)
    clock.slow_down(monkeypatch, engines.LiteRTEngine, lambda k: 2.0)
    assert tiny_feature_model(tiny_model_path, "auto").engine.name == "tf"
    register_toy(monkeypatch)
    clock.slow_down(monkeypatch, EagerEngine, lambda k: 0.1)
    assert tiny_feature_model(tiny_model_path, "auto").engine.name == "toy"
    assert "toy" in clock.runs


@pytest.mark.parametrize("tf_seconds, litert_seconds, winner", [
    (1.0, 1.04, "litert"),   # TF less than 5 % faster: LiteRT's preference keeps it
    (1.0, 1.06, "tf"),       # TF more than 5 % faster
    (1.04, 1.0, "litert"),
])
def test_auto_weighs_each_engine_by_its_registry_preference(tiny_model_path, tmp_path, monkeypatch,
                                                            tf_seconds, litert_seconds, winner):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    clock = FakeClock(monkeypatch)
    clock.slow_down(monkeypatch, engines.TFEngine, lambda k: tf_seconds)
    clock.slow_down(monkeypatch, engines.LiteRTEngine, lambda k: litert_seconds)
    assert tiny_feature_model(tiny_model_path, "auto").engine.name == winner


def test_the_preference_is_per_entry_not_per_engine_name(monkeypatch):
    assert pick_engine({"tf": 150.0, "litert": 100.0}) == "tf"
    register_toy(monkeypatch, preference=2.0)  # a new engine asks for its own margin in its entry
    assert pick_engine({"tf": 150.0, "litert": 100.0, "toy": 80.0}) == "toy"
    assert pick_engine({"tf": 100.0, "toy": 50.0}) == "toy"  # a tie: the preferred one


def test_auto_leaves_out_an_engine_that_cannot_run_the_network(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))

    def cannot_convert(model, spec):
        raise FeaturepipeError("cannot convert 'tiny' to toy")

    register_toy(monkeypatch, make=cannot_convert)
    clock = FakeClock(monkeypatch)
    clock.slow_down(monkeypatch, engines.TFEngine, lambda k: 1.0)
    clock.slow_down(monkeypatch, engines.LiteRTEngine, lambda k: 2.0)
    with pytest.warns(UserWarning, match="cannot convert 'tiny' to toy; auto leaves the toy engine out"):
        assert tiny_feature_model(tiny_model_path, "auto").engine.name == "tf"
    assert set(remembered_choice(tiny_feature_model(tiny_model_path, "tf").spec)["images_per_second"]) == \
        {"tf", "litert"}


def test_engine_used_is_public_and_the_requested_engine_read_only(tiny_model_path):
    model = tiny_feature_model(tiny_model_path, "tf")
    assert model.engine_name == "tf" and model.engine_used is None
    model(random_images(1, 32))
    assert model.engine_used == "tf"
    with pytest.raises(AttributeError):
        model.engine_name = "litert"


def test_several_tf_engines_in_one_process_log_no_retracing_warning(tiny_model_path):
    import logging

    import keras

    heard = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    try:
        batch = np.zeros((2, 32, 32, 3), np.float32)
        for _ in range(7):  # as verify does after a run of many backbones: one engine each
            out = make_engine("tf", keras.models.load_model(tiny_model_path), None).run(batch)
            assert out.shape[0] == 2
    finally:
        tf_logger.removeHandler(handler)
    assert not [m for m in heard if "retracing" in m]
