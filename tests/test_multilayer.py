"""Several layers from one forward pass: each output equals its own single-layer run, on both engines."""

import numpy as np
import pytest

from featurepipe.engines import litert
from featurepipe.backbones import get_backbone
from featurepipe.settings import make_spec, split_layers, with_layers
from featurepipe.engines import FeatureModel, tflite_path
from featurepipe.errors import UsageError

# Not in graph order, so an engine that returned its outputs in graph order would fail.
LAYERS = ("conv_b", "conv_a", "pool_a")


def _spec(tiny_model_path, **kwargs):
    backbone = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    spec, resolved = make_spec(backbone, **kwargs)
    return backbone, spec, resolved


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("engine", ["tf", "litert"])
@pytest.mark.parametrize("pooling, augment", [("avg", "none"), ("max", "flip")])
def test_each_layer_of_one_pass_equals_its_single_layer_run(tiny_model_path, engine, pooling, augment):
    backbone, spec, resolved = _spec(tiny_model_path, pooling=pooling, augment=augment)
    images = _images()
    multi = FeatureModel(backbone, with_layers(spec, LAYERS), resolved, engine=engine)
    outputs = multi(images)
    assert [o.shape for o in outputs] == [(5, 16), (5, 8), (5, 8)]
    for layer, got in zip(LAYERS, outputs):
        single = FeatureModel(backbone, make_spec(backbone, layer=layer, pooling=pooling,
                                                  augment=augment)[0], resolved, engine=engine)
        np.testing.assert_allclose(got, single(images), rtol=1e-5, atol=1e-6)
    assert multi.dim == [16, 8, 8]
    if multi.per_image:  # the per-image path extract's decode threads use
        for layer_rows, got in zip(zip(*(multi.one(image) for image in images)), outputs):
            np.testing.assert_allclose(np.stack(layer_rows), got, rtol=1e-5, atol=1e-6)


def test_litert_runs_the_network_once_per_image_for_all_layers(tiny_model_path, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    interpreter_class = litert._litert_interpreter()
    invokes = []

    class Counting:
        def __init__(self, *args, **kwargs):
            self._it = interpreter_class(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._it, name)

        def invoke(self):
            invokes.append(1)
            self._it.invoke()

    monkeypatch.setattr(litert, "_litert_interpreter", lambda: Counting)
    backbone, spec, resolved = _spec(tiny_model_path)
    outputs = FeatureModel(backbone, with_layers(spec, LAYERS), resolved, engine="litert")(_images(4))
    assert len(outputs) == 3 and len(invokes) == 4


@pytest.mark.parametrize("engine", ["tf", "litert"])
def test_a_one_layer_list_gives_a_one_array_list(tiny_model_path, engine):
    backbone, spec, resolved = _spec(tiny_model_path)
    model = FeatureModel(backbone, with_layers(spec, ["conv_a"]), resolved, engine=engine)
    images = _images(3)
    outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == 1 and outputs[0].shape == (3, 8)
    if model.per_image:
        assert isinstance(model.one(images[0]), list)


def test_tf_model_has_one_input_and_one_output_per_layer(tiny_model_path):
    backbone, spec, resolved = _spec(tiny_model_path)
    model = FeatureModel(backbone, with_layers(spec, LAYERS), resolved, engine="tf")
    model(_images(1))
    keras_model = model.engine.model
    assert len(keras_model.inputs) == 1 and len(keras_model.outputs) == 3


def test_layer_specs_defaults_duplicates_and_cache_keys(tiny_model_path):
    backbone, spec, resolved = _spec(tiny_model_path, layer="conv_a")
    multi = with_layers(spec, [None, "conv_b"])
    assert multi.layer == ("conv_a", "conv_b")  # None / "" is the spec's own layer
    assert [s.layer for s in split_layers(multi)] == ["conv_a", "conv_b"]
    assert split_layers(multi)[1] == make_spec(backbone, layer="conv_b")[0]
    assert len({tflite_path(multi), tflite_path(spec), tflite_path(split_layers(multi)[1])}) == 3
    with pytest.raises(UsageError, match="'conv_b' is named twice"):
        with_layers(spec, ["conv_b", "conv_b"])
    with pytest.raises(UsageError, match="no layer 'nope'"):
        FeatureModel(backbone, with_layers(spec, ["conv_b", "nope"]), resolved, engine="tf")(_images(1))


def test_feature_file_stems_name_backbone_and_layer():
    from featurepipe.backbones import feature_file_stem

    assert feature_file_stem("mobilenet_v2") == "mobilenet_v2"
    assert feature_file_stem("mobilenet_v2", layer="out_relu") == "mobilenet_v2"  # the default
    assert feature_file_stem("mobilenet_v2", layer="block_16_project") == "mobilenet_v2@block_16_project"
    assert feature_file_stem("efficientnet_lite0", layer="block15/add:0", augment="flip") == \
        "efficientnet_lite0@block15_add_0-flip"
    assert feature_file_stem("file:/m/tiny.keras", layer="conv_a") == "tiny@conv_a"
