"""Forward-pass engines and the FeatureModel that ties a backbone, its settings and an engine.

An engine wraps a Keras feature model and maps a preprocessed float32 batch (n, S, S, 3) to
features (n, D). ``ENGINES`` maps an engine name to a factory ``make(model, spec) -> engine``.
"""

import os

import numpy as np

from .backbones import build_feature_model, import_tensorflow, preprocess
from .errors import UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class TFEngine:
    """TensorFlow: the Keras model's call compiled once with ``tf.function``."""

    name = "tf"

    def __init__(self, model, spec=None):
        import_tensorflow()
        import tensorflow as tf

        self.model = model
        size = model.inputs[0].shape[1:]
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, *size), tf.float32)],
            reduce_retracing=True,
        )

    def run(self, batch):
        """batch : ndarray (n, S, S, 3) float32, preprocessed -> ndarray (n, D) float32."""
        return np.asarray(self._forward(batch), dtype=np.float32)


ENGINES = {"tf": TFEngine}


def make_engine(name, model, spec):
    """Build the engine ``name`` for a Keras feature model."""
    if name == "auto":
        name = "tf"
    if name not in ENGINES:
        raise UsageError(f"unknown engine '{name}'; use one of auto, {', '.join(ENGINES)}")
    return ENGINES[name](model, spec)


class FeatureModel:
    """A backbone with fixed settings, ready to turn RGB images into features.

    Parameters
    ----------
    backbone : Backbone
    spec : FeatureSpec
    resolved : ResolvedWeights or None
    engine : str
        ``auto``, ``tf`` or any name in ``ENGINES``.

    The network is built on the first call.
    """

    def __init__(self, backbone, spec, resolved, engine="auto"):
        self.backbone = backbone
        self.spec = spec
        self.resolved = resolved
        self.engine_name = engine
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            model = build_feature_model(self.backbone, self.spec, self.resolved)
            self._engine = make_engine(self.engine_name, model, self.spec)
        return self._engine

    @property
    def dim(self):
        return self.engine.run(np.zeros((1, self.spec.image_size, self.spec.image_size, 3),
                                        np.float32)).shape[1]

    def __call__(self, images):
        """images : ndarray (n, S, S, 3) uint8 RGB -> features ndarray (n, D) float32."""
        x = preprocess(images, self.spec.preprocess)
        features = self.engine.run(x)
        if self.spec.augment == "flip":
            features = (features + self.engine.run(np.ascontiguousarray(x[:, :, ::-1]))) / 2.0
        return features.astype(np.float32, copy=False)


def feature_model_from_attrs(attrs, *, engine="tf", weights=None):
    """Rebuild the FeatureModel a feature file (or a saved model) was made with.

    Parameters
    ----------
    attrs : dict
        The feature file's attributes (backbone, layer, pooling, image_size, resize, preprocess,
        augment, weights_sha256).
    weights : str, optional
        An explicit weights file; otherwise found as for extraction.

    Raises UsageError when the weights found are not the ones the features were made with.
    """
    from .backbones import get_backbone, make_spec

    backbone = get_backbone(str(attrs["backbone"]), preprocess_mode=str(attrs["preprocess"]))
    want = str(attrs.get("weights_sha256", ""))
    spec, resolved = make_spec(backbone, layer=str(attrs.get("layer") or "") or None,
                               pooling=str(attrs.get("pooling", "avg")),
                               image_size=int(attrs["image_size"]),
                               resize=str(attrs.get("resize", "stretch")),
                               augment=str(attrs.get("augment", "none")),
                               weights=weights if weights is not None else ("none" if not want else None))
    if spec.weights_sha256 != want:
        raise UsageError(f"the weights found for '{backbone.name}' ({spec.weights_source}, sha256 "
                         f"{spec.weights_sha256[:12]}...) are not the ones the features were made with "
                         f"(sha256 {want[:12]}...); pass --weights with that file")
    return FeatureModel(backbone, spec, resolved, engine=engine)
