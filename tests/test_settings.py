"""One settings dataclass: every field is recorded in the feature file and honoured by predict."""

from dataclasses import fields, replace

import numpy as np
import pytest

from conftest import make_image
from featurepipe.engines import rebuild_feature_model
from featurepipe.errors import UsageError
from featurepipe.extract import extract
from featurepipe.fit import fit
from featurepipe.predict import feature_models, load_bundle
from featurepipe.reader import read_images
from featurepipe.settings import OLD_DEFAULTS, ExtractionSettings, check_settings
from featurepipe.store import load

# A value other than the default for every setting a user chooses (the weights come with the file).
CHOSEN = dict(layer="conv_a", pooling="max", image_size=40, resize="crop", preprocess="tf",
              augment="flip", decode="exact")


@pytest.fixture(scope="module")
def free_size_model(tmp_path_factory):
    """A small saved Keras model that takes any input size (so image_size is a free setting)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_b")(x)
    path = tmp_path_factory.mktemp("free") / "free.keras"
    keras.Model(inputs, x).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEGs large enough for scaled decoding to differ from exact decoding, not square (crop)."""
    root = tmp_path_factory.mktemp("photos") / "data"
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40))):
        for i in range(6):
            make_image(root / f"class{c}" / f"img_{i}.jpg", colour, size=(330, 240), seed=10 * c + i)
    return root


@pytest.fixture(scope="module")
def written(photos, free_size_model, tmp_path_factory):
    """(settings recorded in the file, the file) of an extraction with every chosen setting."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("FEATUREPIPE_DATA", str(home / "data"))
        mp.setenv("FEATUREPIPE_MODELS", str(home / "models"))
        mp.setenv("FEATUREPIPE_CACHE", str(home / "cache"))
        [result] = extract(photos, [f"file:{free_size_model}"], out=home / "features", engine="tf",
                           quiet=True, verify=0, test_size=0.5, **CHOSEN)
        model = fit([result.path], "logreg", cv=2, n_jobs=1).model
    return ExtractionSettings.from_attrs(load(result.path).attrs), result.path, model


def test_every_field_is_recorded_in_the_written_file(written, free_size_model):
    settings, path, _ = written
    attrs = load(path).attrs
    for f in fields(ExtractionSettings):
        assert f.name in attrs, f"'{f.name}' is not recorded"
        assert str(attrs[f.name]) == str(getattr(settings, f.name)), f.name
    for name, value in CHOSEN.items():
        assert getattr(settings, name) == value, name
    assert settings.backbone == f"file:{free_size_model}" and len(settings.weights_sha256) == 64


def _features(settings, path, engine="tf"):
    """Features of the file's images made afresh with ``settings`` (as predict makes them)."""
    stored = load(path)
    model = rebuild_feature_model(settings, engine=engine)
    files = [str(stored.attrs["data_root"]) + "/" + p for p in stored.paths]
    images = np.stack([r.outputs[0] for r in read_images(files, [settings.target()])])
    return stored.X, model(images)


def test_predict_rebuilds_every_field_and_gets_the_stored_features(written):
    settings, path, model_path = written
    bundle = load_bundle(model_path)
    [rebuilt] = feature_models(bundle, engine="tf")
    for f in fields(ExtractionSettings):
        assert getattr(rebuilt.spec, f.name) == getattr(settings, f.name), f"predict ignores '{f.name}'"
    stored, fresh = _features(rebuilt.spec, path)
    np.testing.assert_allclose(fresh, stored, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CHOSEN))
def test_each_chosen_setting_changes_the_features(written, name):
    """So the check above would fail if predict used a default instead of the recorded value."""
    settings, path, _ = written
    default = {"layer": "", "pooling": "avg", "image_size": 32, "resize": "stretch", "preprocess": "scale",
               "augment": "none", "decode": "scaled"}[name]
    stored, fresh = _features(replace(settings, **{name: default}), path)
    assert fresh.shape != stored.shape or not np.allclose(fresh, stored, rtol=1e-3, atol=1e-4)


def test_files_made_before_a_field_existed_read_with_the_old_value(written):
    settings, path, _ = written
    old = {k: v for k, v in settings.attrs().items() if k not in OLD_DEFAULTS}
    read = ExtractionSettings.from_attrs(old)
    assert read.decode == "exact" and read.pooling == "avg" and read.layer == ""
    with pytest.raises(UsageError, match="image_size"):
        ExtractionSettings.from_attrs({k: v for k, v in old.items() if k != "image_size"})


@pytest.mark.parametrize("bad, option", [
    (dict(pooling="mean"), "--pooling"), (dict(image_size=8), "--image-size"),
    (dict(resize="squash"), "--resize"), (dict(augment="rotate"), "--augment"),
    (dict(preprocess="bogus"), "--preprocess"), (dict(decode="fast"), "--decode")])
def test_every_value_is_checked_in_one_place(bad, option):
    with pytest.raises(UsageError, match=option):
        check_settings(**bad)


def test_a_file_with_preprocessing_its_registry_backbone_no_longer_uses_names_the_fix():
    old = ExtractionSettings(backbone="squeezenet", layer="fire9", pooling="avg", image_size=227,
                             resize="stretch", preprocess="tf", augment="none", decode="exact",
                             weights_source="", weights_sha256="")
    with pytest.raises(UsageError) as err:
        rebuild_feature_model(old)
    message = str(err.value)
    assert "extract them again" in message and "--overwrite" in message and "--preprocess" not in message
