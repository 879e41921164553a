import inspect

import numpy as np
import pytest

from conftest import FLOWERS, WEIGHTS, needs_shared
from featurepipe import backbones
from featurepipe.backbones import (BACKBONES, KerasApp, build_feature_model, get_backbone, preprocess, resolve_weights)
from featurepipe.settings import make_spec
from featurepipe.errors import UsageError

KERAS_APPS = [name for name, b in BACKBONES.items() if isinstance(b.builder, KerasApp)]
LITE = [name for name, b in BACKBONES.items() if b.architecture_in_weights]
# The smallest input each application accepts (32 unless Keras says otherwise).
SMALLEST = {"inception_v3": 75, "inception_resnet_v2": 75, "xception": 71}
# One network per keras.applications module runs numerically (random weights, both models built);
# its siblings share that module's code and are checked structurally (see docs/backbones.md).
NUMERIC = ["mobilenet", "mobilenet_v2", "vgg16", "vgg19", "resnet50", "resnet50_v2", "inception_v3",
           "xception", "densenet121", "efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny",
           "inception_resnet_v2", "mobilenet_v3_small", "nasnet_mobile"]


def _keras_module(entry):
    return entry.builder.module


def _application_source(module):
    """The source of an application module and of the application modules it builds on
    (ResNet50V2 is built, and its weights hashed, in resnet.py)."""
    used = [m for m in vars(module).values()
            if inspect.ismodule(m) and m.__name__.startswith("keras.src.applications.")]
    return "\n".join(inspect.getsource(m) for m in [module, *used])


@pytest.mark.parametrize("name", KERAS_APPS)
def test_registry_entry_matches_its_keras_application(name):
    """Preprocessing = the application's preprocess_input; the download hash is the one Keras
    checks; the default layer pooled = the application's own pooled output, of size ``dim``
    (built without allocating weights, at the smallest input)."""
    import keras

    entry = BACKBONES[name]
    module = _keras_module(entry)
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(preprocess(images, entry.preprocess),
                               module.preprocess_input(images.copy()), rtol=1e-5, atol=1e-4)
    source = _application_source(module)
    published = [w.sha256 or w.md5 for w in entry.weights if w.url and (w.sha256 or w.md5)]
    assert all(digest in source for digest in published)
    with keras.StatelessScope(initialize_variables=False):
        pooled = entry.builder(None, SMALLEST.get(name, 32), pooling="avg")
    keras.backend.clear_session()  # forget the uninitialised variables
    assert pooled.output_shape == (None, entry.dim)
    if entry.layer:
        pool = pooled.layers[-1]
        assert isinstance(pool, keras.layers.GlobalAveragePooling2D)
        assert pool.input is pooled.get_layer(entry.layer).output
    else:
        assert entry.pools_inside or isinstance(pooled.layers[-1], keras.layers.GlobalAveragePooling2D)


def test_every_keras_application_module_has_a_numeric_check():
    modules = {_keras_module(BACKBONES[name]).__name__ for name in KERAS_APPS}
    assert {_keras_module(BACKBONES[name]).__name__ for name in NUMERIC} == modules


@pytest.mark.parametrize("name", NUMERIC)
def test_features_equal_the_keras_applications_pooled_output(name):
    """Random weights, smallest input: our pixels -> features equal preprocess_input + the
    application with pooling="avg" run with the same weights."""
    import keras

    from featurepipe.engines import pixel_model

    entry = BACKBONES[name]
    size = SMALLEST.get(name, 32)
    spec, _ = make_spec(entry, weights="none", image_size=size)
    ours_model = pixel_model(entry, spec, None)
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ours = keras.ops.convert_to_numpy(ours_model(images, training=False))
    with keras.StatelessScope(initialize_variables=False):  # its weights are ours, given below
        reference = getattr(keras.applications, entry.builder.attr)(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
            **dict(entry.builder.kwargs))
    ours_values = dict(zip((id(v) for v in reference.variables),
                           (v.value for v in ours_model.variables)))
    assert len(ours_values) == len(ours_model.variables)
    x = _keras_module(entry).preprocess_input(images.astype(np.float32))
    expected, _ = reference.stateless_call(
        [ours_values[id(v)] for v in reference.trainable_variables],
        [ours_values[id(v)] for v in reference.non_trainable_variables], x, training=False)
    keras.backend.clear_session()
    expected = keras.ops.convert_to_numpy(expected)
    assert ours.shape == (2, entry.dim)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("mode, module", [
    ("caffe", "vgg16"), ("tf", "mobilenet_v2"), ("torch", "densenet"), ("none", "efficientnet")])
def test_preprocessing_matches_keras_and_never_modifies_input(mode, module):
    import keras

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    before = images.copy()
    ours = preprocess(images, mode)
    reference = getattr(keras.applications, module).preprocess_input(images.copy())
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(images, before)
    assert ours.dtype == np.float32


def test_lite_and_scale_preprocessing():
    x = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    np.testing.assert_allclose(preprocess(x, "lite")[0, 0, 0], [-127 / 128, 0, 1])
    np.testing.assert_allclose(preprocess(x, "scale")[0, 0, 0], [0, 127 / 255, 1])
    with pytest.raises(UsageError, match="unknown preprocessing"):
        preprocess(x, "bogus")


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UsageError, match="known: squeezenet, mobilenet"):
        get_backbone("alexnet")


def test_file_backbone_needs_preprocess_and_existing_file(tiny_model_path, tmp_path):
    with pytest.raises(UsageError, match="--preprocess"):
        get_backbone(f"file:{tiny_model_path}")
    with pytest.raises(UsageError, match="not found"):
        get_backbone(f"file:{tmp_path / 'nope.keras'}", preprocess_mode="tf")
    entry = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    assert entry.input_size == 32
    spec, resolved = make_spec(entry, layer="conv_a", pooling="max")
    model = build_feature_model(entry, spec, resolved)
    assert model.output_shape == (None, 8)


def test_bad_layer_is_a_usage_error(tiny_model_path):
    entry = get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale")
    spec, resolved = make_spec(entry, layer="nope")
    with pytest.raises(UsageError, match="no layer 'nope'"):
        build_feature_model(entry, spec, resolved)


def test_offline_without_weights_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(backbones, "weights_search_dirs", lambda: [tmp_path])
    monkeypatch.setattr(backbones, "_download", lambda known: None)
    with pytest.raises(UsageError, match="FEATUREPIPE_WEIGHTS.*--weights"):
        resolve_weights(get_backbone("vgg16"))


def test_weights_found_in_env_folder_and_damaged_file_refused(tmp_path, monkeypatch):
    entry = get_backbone("squeezenet")
    fake = tmp_path / entry.weights[0].filename
    fake.write_bytes(b"truncated")
    monkeypatch.setattr(backbones, "weights_search_dirs", lambda: [tmp_path])
    with pytest.raises(UsageError, match="damaged"):
        resolve_weights(entry)
    with pytest.raises(UsageError, match="damaged"):
        resolve_weights(entry, weights=fake)
    with pytest.raises(UsageError, match="not found"):
        resolve_weights(entry, weights=tmp_path / "missing.h5")


# ----------------------------------------------------------------- real weights (../shared)


def _flower_batch(classes=("daisy", "sunflower"), n=8, size=227):
    from featurepipe.reader import load_image

    images, labels = [], []
    for k, c in enumerate(classes):
        for path in sorted((FLOWERS / c).iterdir())[:n]:
            images.append(load_image(path, size)[0])
            labels.append(k)
    return np.stack(images), np.array(labels)


def _cv_accuracy(X, y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X = 10 * X / np.linalg.norm(X, axis=1, keepdims=True)
    return cross_val_score(LogisticRegression(max_iter=2000), X, y, cv=4).mean()


@needs_shared
def test_squeezenet_real_weights_separate_two_classes():
    from featurepipe.engines import FeatureModel

    entry = get_backbone("squeezenet")
    spec, resolved = make_spec(entry)
    assert resolved.sha256 == entry.weights[0].sha256
    images, labels = _flower_batch(n=24)
    features = FeatureModel(entry, spec, resolved, engine="tf")(images)
    assert features.shape == (48, 512) and (features >= 0).all()
    assert _cv_accuracy(features, labels) >= 0.85
    random_spec, _ = make_spec(entry, weights="none")
    random_features = FeatureModel(entry, random_spec, None, engine="tf")(images)
    assert not np.allclose(random_features, features)


@needs_shared
def test_mobilenet_v2_matches_its_reference_model():
    import keras

    from featurepipe.engines import FeatureModel

    images, _ = _flower_batch(n=3, size=224)
    entry = get_backbone("mobilenet_v2")
    spec, resolved = make_spec(entry)
    ours = FeatureModel(entry, spec, resolved, engine="tf")(images)
    ref_model = keras.applications.MobileNetV2(
        include_top=False, weights=str(WEIGHTS / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"),
        input_shape=(224, 224, 3), pooling="avg")
    ref = ref_model.predict(keras.applications.mobilenet_v2.preprocess_input(images.astype("float32")), verbose=0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@needs_shared
@pytest.mark.parametrize("name, size", [
    ("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_efficientnet_lite_matches_its_model_cut_at_avg_pool(name, size):
    import keras

    from featurepipe.engines import FeatureModel

    entry = get_backbone(name)
    assert (entry.input_size, entry.layer, entry.dim) == (size, "avg_pool", 1280)
    spec, resolved = make_spec(entry)
    assert resolved.sha256 == entry.weights[0].sha256 == backbones.file_sha256(
        WEIGHTS / f"{name}_imagenet.keras")
    images, _ = _flower_batch(n=1, size=size)
    ours = FeatureModel(entry, spec, resolved, engine="tf")(images)
    full = keras.models.load_model(WEIGHTS / f"{name}_imagenet.keras", compile=False)
    cut = keras.Model(full.inputs, full.get_layer("avg_pool").output)
    ref = cut.predict((images.astype("float32") - 127.0) / 128.0, verbose=0)
    assert ours.shape == (2, 1280)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
