"""Fine-tuned baseline: both stages, trainable layers, head equivalence, resume, predict."""

import json

import numpy as np
import pytest

from conftest import make_dataset, make_image
from featurepipe import finetune as ft
from featurepipe.cli import run_main
from featurepipe.errors import UsageError
from featurepipe.extract import extract
from featurepipe.predict import predict
from featurepipe.reader import load_image
from featurepipe.store import load

FAST = dict(head_epochs=3, head_lr=0.05, lr=0.01, batch_size=8, quiet=True)


@pytest.fixture(scope="module")
def bn_model_path(tmp_path_factory):
    """A tiny backbone (32x32 input) with batch norm: conv_a, bn_a, pool_a, conv_b, bn_b, relu_b."""
    import keras

    keras.utils.set_random_seed(2)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.MaxPooling2D(2, name="pool_a")(x)
    x = keras.layers.Conv2D(16, 3, name="conv_b")(x)
    x = keras.layers.BatchNormalization(name="bn_b")(x)
    x = keras.layers.Activation("relu", name="relu_b")(x)
    model = keras.Model(inputs, x, name="tiny_bn")
    for layer in (model.get_layer("bn_a"), model.get_layer("bn_b")):
        n = layer.moving_mean.shape[0]
        rng = np.random.default_rng(n)
        layer.set_weights([np.ones(n), np.zeros(n), rng.normal(0, 0.1, n), np.full(n, 0.5)])
    path = tmp_path_factory.mktemp("bn") / "tiny_bn.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def bn_features(bn_model_path, tmp_path_factory):
    """Features of 3 classes x 10 generated images (train/test split only)."""
    root = make_dataset(tmp_path_factory.mktemp("data") / "colors", n_per_class=10)
    out = tmp_path_factory.mktemp("features") / "colors"
    with pytest.MonkeyPatch.context() as mp:  # module scope: keep latest.json out of the checkout
        mp.setenv("FEATUREPIPE_DATA", str(tmp_path_factory.mktemp("home")))
        [result] = extract(root, [f"file:{bn_model_path}"], out=out, preprocess="scale", quiet=True)
    return result.path


def _weights(model, name):
    return [np.array(w) for w in model.get_layer(name).get_weights()]


def _base_layer(model, name):
    return {layer.name: layer for layer in ft.model.flat_layers(ft.base_of(model))}[name]


def test_both_stages_train_only_the_chosen_layers(bn_model_path, bn_features, tmp_path):
    import keras

    class Snapshot(keras.callbacks.Callback):
        weights = {}

        def on_epoch_end(self, epoch, logs=None):
            self.weights[epoch] = {l.name: [np.array(w) for w in l.get_weights()]
                                   for l in ft.model.flat_layers(ft.base_of(self.model))}

    result = ft.finetune(backbone=f"file:{bn_model_path}", features=bn_features, epochs=2,
                         patience=5, models_dir=tmp_path / "models", callbacks=[Snapshot()], **FAST)
    assert result.model_path == tmp_path / "models" / "colors" / "tiny_bn__finetune.keras"
    meta = json.loads(result.json_path.read_text())
    assert meta["clf"] == "finetune" and meta["features"] == "tiny_bn"
    assert meta["cv_mean"] is None and meta["cv_std"] is None
    assert meta["class_names"] == ["blue", "green", "red"]
    assert meta["attrs"]["preprocess"] == "scale" and meta["attrs"]["image_size"] == 32
    for key in ("test_accuracy", "test_macro_f1", "fit_seconds", "predict_ms_per_image"):
        assert isinstance(meta[key], float)
    assert meta["stage1"]["epochs"] >= 1
    assert [h["epoch"] for h in meta["history"]] == [0, 1, 2]
    assert "loss" in meta["history"][1] and meta["epochs_run"] == 2
    assert "conv_b" in meta["best_params"]
    assert not (tmp_path / "models" / "colors" / ".tiny_bn__finetune.work").exists()

    model = keras.models.load_model(result.model_path)
    trainable = sorted(layer.name for layer in ft.model.flat_layers(ft.base_of(model))
                       if layer.trainable_weights)
    assert trainable == ["conv_b"]  # default: from the topmost conv; bn_b stays frozen
    assert not _base_layer(model, "bn_b").trainable and not _base_layer(model, "bn_a").trainable
    # Batch norm runs in inference mode even in a training call: same output as inference.
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    base = ft.base_of(model)
    np.testing.assert_allclose(np.asarray(base(x, training=True)), np.asarray(base(x, training=False)),
                               atol=1e-6)
    original = keras.models.load_model(bn_model_path)
    # Stage 2 changed the unfrozen conv and nothing below it; batch-norm statistics untouched.
    trained = Snapshot.weights[1]
    assert not np.allclose(_weights(original, "conv_b")[0], trained["conv_b"][0])
    for name in ("conv_a", "bn_a", "bn_b"):
        for a, b, c in zip(_weights(original, name), trained[name], _base_layer(model, name).get_weights()):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_cached_head_equals_head_on_live_base(bn_model_path, bn_features, tmp_path):
    import keras

    result = ft.finetune(backbone=f"file:{bn_model_path}", features=bn_features, epochs=0,
                         unfreeze="conv_a", models_dir=tmp_path, **FAST)
    model = keras.models.load_model(result.model_path)
    trainable = sorted(l.name for l in ft.model.flat_layers(ft.base_of(model)) if l.trainable_weights)
    assert trainable == ["conv_a", "conv_b"]  # a named layer and everything above it
    feats = load(bn_features).subset("test")
    root = feats.attrs["data_root"]
    cached = np.asarray(model.get_layer("head")(feats.X, training=False))
    images = np.stack([load_image(f"{root}/{p}", 32)[0] for p in feats.paths]).astype(np.float32)
    live = model.predict(images, verbose=0)
    assert cached.max() > 0.5  # the head learned something
    np.testing.assert_allclose(live, cached, atol=1e-5)
    assert result.test_accuracy == pytest.approx(np.mean(cached.argmax(1) == feats.y))

    fmodel = ft.model.feature_model_of(load(bn_features).attrs, None)
    assert ft.model.resolve_unfreeze(2, fmodel) == (2, "top 2 layers")
    with pytest.raises(UsageError, match="no layer named 'nope'"):
        ft.finetune(backbone=f"file:{bn_model_path}", features=bn_features, unfreeze="nope",
                    models_dir=tmp_path, **FAST)

    bad = make_image(tmp_path / "bad.jpg", (0, 0, 0))
    bad.write_bytes(b"not an image")
    rows = predict(result.model_path, [f"{root}/{p}" for p in feats.paths] + [bad], batch_size=4)
    names = [feats.class_names[k] for k in cached.argmax(1)]
    assert [r.label for r in rows[:-1]] == names
    np.testing.assert_allclose([r.probability for r in rows[:-1]], cached.max(1), atol=1e-5)
    assert rows[-1].path == str(bad) and rows[-1].label == "" and "not an image" in rows[-1].error


def test_killed_run_resumes_from_last_epoch(bn_model_path, bn_features, tmp_path):
    import keras

    class Killed(Exception):
        pass

    class KillAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise Killed

    class Record(keras.callbacks.Callback):
        epochs, iterations = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)
            self.iterations.append(int(self.model.optimizer.iterations.numpy()))

    args = dict(backbone=f"file:{bn_model_path}", features=bn_features, epochs=3, patience=9,
                models_dir=tmp_path, **FAST)
    with pytest.raises(Killed):
        ft.finetune(**args, callbacks=[KillAfter()])
    work = tmp_path / "colors" / ".tiny_bn__finetune.work"
    assert json.loads((work / "state.json").read_text())["epoch"] == 1  # epoch 1 checkpointed
    result = ft.finetune(**args, callbacks=[Record()])
    assert Record.epochs == [1, 2] and result.resumed_from == 1 and result.epochs_run == 3
    n_batches = -(-json.loads(result.json_path.read_text())["n_train"] // 8)
    assert Record.iterations[0] == n_batches  # the optimizer state came back too
    history = json.loads(result.json_path.read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]


def test_preprocess_layer_matches_numpy():
    from featurepipe.backbones import PREPROCESS, preprocess

    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for mode in PREPROCESS:
        layer = ft.model._preprocess_layer(mode)
        np.testing.assert_allclose(np.asarray(layer(x)), preprocess(x, mode), rtol=1e-5, atol=1e-4)


def test_cli_errors(tiny_data, capsys):
    assert run_main(ft.main, ["--data", str(tiny_data), "--backbone", "mobilenet_v2"]) == 2
    err = capsys.readouterr().err
    assert "python -m featurepipe.extract --data" in err and "--extract" in err
    assert run_main(ft.main, ["--data", str(tiny_data), "--epochs", "-1"]) == 2
    assert run_main(ft.main, ["--backbone", "mobilenet_v2"]) == 2
