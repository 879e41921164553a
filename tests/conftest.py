"""Shared fixtures: tiny generated image folders and a tiny Keras network."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(os.environ.get("FEATUREPIPE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
WEIGHTS = SHARED / "weights"
FLOWERS = SHARED / "datasets" / "flowers5"

needs_shared = pytest.mark.skipif(not WEIGHTS.is_dir() or not FLOWERS.is_dir(),
                                  reason="../shared (real weights and flowers5) not beside the checkout")

COLORS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def make_image(path, color, size=(40, 32), seed=0, fmt=None):
    """A noisy image of one dominant colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_dataset(root, n_per_class=6, classes=("blue", "green", "red"), ext=".png", start=0):
    root = Path(root)
    for c in classes:
        for i in range(start, start + n_per_class):
            make_image(root / c / f"img_{i:03d}{ext}", COLORS[c], seed=hash((c, i)) % 1000)
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(tmp_path / "colors")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A small saved Keras model (32x32 input) with a spatial last layer."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool_a")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv_b")(x)
    model = keras.Model(inputs, x, name="tiny")
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One engine cache (converted models, auto choices) shared by the tests of a session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, session_cache):
    """Every test writes data/ and models/ under its own temporary folder."""
    monkeypatch.setenv("FEATUREPIPE_DATA", str(tmp_path / "home" / "data"))
    monkeypatch.setenv("FEATUREPIPE_MODELS", str(tmp_path / "home" / "models"))
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(session_cache))
    if WEIGHTS.is_dir():
        monkeypatch.setenv("FEATUREPIPE_WEIGHTS", str(WEIGHTS))
    yield
