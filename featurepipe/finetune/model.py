"""The live network: backbone + in-graph preprocessing + head, which layers train, and
loading a saved model (``featurepipe.predict`` classifies image files with it)."""

import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..backbones import PREPROCESS
from ..errors import DataError, UsageError


# Where stage 2 starts unfreezing, per backbone: a layer name (or name prefix: the first layer
# matching it and every layer above it) or a count of top layers. Other backbones (file:PATH, or a
# feature file cut at another layer) unfreeze from their topmost layer with weights.
DEFAULT_UNFREEZE = {
    "squeezenet": "fire9",            # the last fire module
    "mobilenet": "conv_dw_13",        # the last depthwise + pointwise pair
    "mobilenet_v2": "block_16",       # the last inverted residual block + Conv_1
    "efficientnet_lite0": "block15",  # the last MBConv block + head_conv
    "efficientnet_b0": "block7a",     # the last MBConv block + top_conv
    "vgg16": "block5",
    "vgg19": "block5",
    "resnet50": "conv5_block3",
    "inception_v3": 31,               # the mixed10 module (its layers have numbered names)
    "xception": "block14",
    "densenet121": "conv5_block16",
}


AUGMENT_ROTATION = 0.03   # fraction of a full turn (about +-11 degrees)


AUGMENT_ZOOM = 0.1


def feature_model_of(attrs, weights):
    from ..engines import rebuild_feature_model
    from ..settings import ExtractionSettings

    if str(attrs.get("augment", "none")) != "none":
        warnings.warn(f"the feature file was made with augment={attrs['augment']} (features averaged "
                      "with the mirror image); the stage-1 head is trained on those", stacklevel=3)
    return rebuild_feature_model(ExtractionSettings.from_attrs(attrs), weights=weights)


def flat_layers(model):
    """The layers of a (possibly nested) Keras model in order, input layers skipped."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += flat_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def base_layers(feature_model):
    """The backbone's own layers (the global pooling featurepipe adds left out)."""
    return [layer for layer in flat_layers(feature_model) if layer.name != "featurepipe_pool"]


def resolve_unfreeze(unfreeze, fmodel):
    """Turn ``unfreeze`` (None, int, "all", a name or prefix) into (layer count from the top, label)."""
    from ..backbones import build_feature_model

    layers = base_layers(build_feature_model(fmodel.backbone, fmodel.spec, fmodel.resolved))
    names = [layer.name for layer in layers]
    if unfreeze is None:
        unfreeze = DEFAULT_UNFREEZE.get(fmodel.backbone.name)
        if isinstance(unfreeze, str) and not any(n.startswith(unfreeze) for n in names):
            unfreeze = None
        if unfreeze is None:
            return _top_weighted(layers)
    if isinstance(unfreeze, int):
        return min(unfreeze, len(layers)), f"top {min(unfreeze, len(layers))} layers"
    if unfreeze == "all":
        return len(layers), "all"
    exact = [i for i, n in enumerate(names) if n == unfreeze]
    prefix = [i for i, n in enumerate(names) if n.startswith(unfreeze)]
    if exact or prefix:
        first = (exact or prefix)[0]
        return len(layers) - first, f"{unfreeze} (top {len(layers) - first} layers)"
    raise UsageError(f"backbone '{fmodel.backbone.name}' has no layer named '{unfreeze}' (or "
                     f"starting with it); see python -m featurepipe.extract --list-layers "
                     f"{fmodel.backbone.name}, or pass --unfreeze N (top N layers)")


def _top_weighted(layers):
    """From the topmost layer with weights (not batch norm) upward."""
    import keras

    weighted = [i for i, layer in enumerate(layers)
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    if not weighted:
        return 0, "none (no layer with weights)"
    n = len(layers) - weighted[-1]
    return n, f"{layers[weighted[-1]].name} (top {n} layers)"


def _affine_preprocess(mode):
    """(A, b) with ``preprocess(x, mode) == x @ A + b`` per pixel: A (3, 3), b (3,), float32."""
    fn = PREPROCESS[mode]
    b = fn(np.zeros((1, 3), np.float32))[0]
    A = np.stack([fn(np.eye(3, dtype=np.float32)[i:i + 1])[0] - b for i in range(3)])
    probe = np.random.default_rng(0).uniform(0, 255, (8, 3)).astype(np.float32)
    if not np.allclose(fn(probe), probe @ A + b, atol=1e-3):
        raise UsageError(f"preprocessing '{mode}' is not per-pixel affine; cannot put it in the graph")
    return A.astype(np.float32), b.astype(np.float32)


def _preprocess_layer(mode):
    """A frozen 1x1 convolution doing the file's preprocessing in the graph (no custom layer)."""
    import keras

    A, b = _affine_preprocess(mode)
    layer = keras.layers.Conv2D(3, 1, name=f"preprocess_{mode}", trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([A.reshape(1, 1, 3, 3), b])
    return layer


def make_head(dim, n_classes, dropout, seed):
    """The classifier head: Dropout + Dense softmax, (n, dim) -> (n, n_classes)."""
    import keras

    return keras.Sequential([
        keras.Input((dim,)),
        keras.layers.Dropout(dropout, seed=seed, name="head_dropout"),
        keras.layers.Dense(n_classes, activation="softmax", name="head_dense"),
    ], name="head")


def build_finetune_model(fmodel, head, *, augment=True, seed=0):
    """The live network: RGB images (n, S, S, 3), values 0..255 -> class probabilities (n, C).

    Augmentation layers act only when training. The backbone is the nested feature model
    (``featurepipe.backbones.build_feature_model``), frozen; see ``set_trainable``.
    """
    import keras

    from ..backbones import build_feature_model

    size = int(fmodel.spec.image_size)
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
        x = keras.layers.RandomRotation(AUGMENT_ROTATION, fill_mode="reflect", seed=seed + 1,
                                        name="augment_rotation")(x)
        x = keras.layers.RandomZoom(AUGMENT_ZOOM, fill_mode="reflect", seed=seed + 2,
                                    name="augment_zoom")(x)
    x = _preprocess_layer(fmodel.spec.preprocess)(x)
    built = build_feature_model(fmodel.backbone, fmodel.spec, fmodel.resolved)
    # A copy: a file: backbone's layers are shared with the (cached) model extraction uses,
    # and training must not change those.
    base = keras.models.clone_model(built)
    base.set_weights(built.get_weights())
    outputs = head(base(x))
    return keras.Model(inputs, outputs, name="finetune")


def base_of(model):
    """The nested feature model inside a model made by ``build_finetune_model``."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "head":
            return layer
    raise DataError(f"model '{model.name}' has no nested backbone")


def set_trainable(model, n_top):
    """Freeze the backbone except its top ``n_top`` layers; BatchNormalization always frozen.

    A frozen BatchNormalization layer (``trainable=False``) runs in inference mode in Keras 3,
    whatever the ``training`` flag. The head stays trainable; preprocessing stays frozen.
    """
    import keras

    base = base_of(model)
    base.trainable = True
    layers = base_layers(base)
    for layer in flat_layers(base):
        layer.trainable = False
    for layer in layers[len(layers) - n_top:] if n_top else []:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    for layer in model.layers:
        if layer.name.startswith("preprocess_"):
            layer.trainable = False


def save_atomic(model, path):
    """Save a Keras model under a temporary name, renamed into place; its sha256."""
    import hashlib

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return digest


def load_finetuned(model_path):
    """(Keras model, its ``.json`` metadata) of a ``<name>__finetune.keras`` (classified by
    ``featurepipe.predict.FinetunedModel``)."""
    import keras

    model_path = Path(model_path)
    meta_path = model_path.with_suffix(".json")
    if not model_path.is_file():
        raise UsageError(f"model not found: '{model_path}'")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"'{meta_path}' (class names of {model_path.name}) is missing or unreadable: {err}") from None
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as err:
        raise DataError(f"cannot load Keras model '{model_path}': {type(err).__name__}: {err}") from None
    return model, meta
