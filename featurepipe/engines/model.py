"""``FeatureModel``: a backbone, its settings and an engine, from RGB pixels to pooled features."""


import numpy as np

from ..backbones import PREPROCESS, build_feature_model
from ..errors import UsageError
from .base import ModelSource, PerImageEngine
from .choice import make_engine
from .registry import check_engine_name

def pixel_model(backbone, spec, resolved):
    """A Keras model from RGB pixels to features, preprocessing included.

    Returns
    -------
    keras.Model mapping (n, S, S, 3) uint8 to (n, D) float32 (S = ``spec.image_size``)
    """
    import keras

    network = build_feature_model(backbone, spec, resolved)
    mode = PREPROCESS[spec.preprocess]
    pixels = keras.Input((spec.image_size, spec.image_size, 3), dtype="uint8", name="pixels")
    x = keras.layers.Lambda(lambda t: mode(keras.ops.cast(t, "float32")), name="preprocess")(pixels)
    return keras.Model(pixels, network(x), name=f"{network.name}_from_pixels")


# --------------------------------------------------------------------------- feature model


class FeatureModel:
    """A backbone with fixed settings, ready to turn RGB images into features.

    Parameters
    ----------
    backbone : Backbone
    spec : ExtractionSettings
    resolved : ResolvedWeights or None
    engine : str
        ``auto`` or a key of ``ENGINES``.

    The engine (and the network, when the engine needs it) is built on first use of ``engine``;
    ``engine_used`` then names the engine really used (``auto`` resolved). With a multi-layer spec
    (``backbones.with_layers``) one forward pass gives every layer: calls return a list of
    arrays, one per layer in the spec's order.
    """

    def __init__(self, backbone, spec, resolved, engine="auto"):
        check_engine_name(engine)
        self.backbone = backbone
        self.spec = spec
        self.resolved = resolved
        self._engine_name = engine
        self._engine = None

    @property
    def engine_name(self):
        """The engine asked for: ``auto`` or a key of ``ENGINES`` (read-only)."""
        return self._engine_name

    @property
    def engine_used(self):
        """The name of the engine really built (never ``auto``), or None before it is built."""
        return None if self._engine is None else self._engine.name

    @property
    def engine(self):
        """The Engine, built on first use."""
        if self._engine is None:
            source = ModelSource(lambda: pixel_model(self.backbone, self.spec, self.resolved))
            self._engine = make_engine(self._engine_name, source, self.spec)
        return self._engine

    @property
    def dim(self):
        """Feature size (a list of them for a multi-layer spec)."""
        out = self.engine.run(np.zeros((1, self.spec.image_size, self.spec.image_size, 3), np.uint8))
        return [o.shape[1] for o in out] if isinstance(out, list) else out.shape[1]

    def __call__(self, images):
        """images : ndarray (n, S, S, 3) uint8 RGB -> features ndarray (n, D) float32.

        Other dtypes are rounded and clipped to 0..255.
        """
        images = _as_pixels(images)
        features = self.engine.run(images)
        if self.spec.augment == "flip":
            features = _mean(features, self.engine.run(np.ascontiguousarray(images[:, :, ::-1])))
        return self._per_layer(_float32(features))

    @property
    def per_image(self):
        """True when the engine runs single images from many threads at once (``one``)."""
        return isinstance(self.engine, PerImageEngine)

    def one(self, image):
        """image : ndarray (S, S, 3) uint8 RGB -> features ndarray (D,) float32 (needs ``per_image``);
        safe to call from several threads at once."""
        image = _as_pixels(image)
        features = self.engine.run_one(image)
        if self.spec.augment == "flip":
            features = _mean(features, self.engine.run_one(np.ascontiguousarray(image[:, ::-1])))
        return self._per_layer(_float32(features))

    def _per_layer(self, features):
        """A list for every multi-layer spec, even of one layer (LiteRT gives an array when the
        converted model has a single output)."""
        if isinstance(self.spec.layer, tuple) and not isinstance(features, list):
            return [features]
        return features


def _mean(a, b):
    """The mean of two engine outputs (arrays, or lists of arrays for multi-layer models)."""
    if isinstance(a, list):
        return [(x + y) / 2.0 for x, y in zip(a, b)]
    return (a + b) / 2.0


def _float32(features):
    if isinstance(features, list):
        return [f.astype(np.float32, copy=False) for f in features]
    return features.astype(np.float32, copy=False)


def _as_pixels(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return images


def rebuild_feature_model(settings, *, engine="tf", weights=None):
    """The FeatureModel a feature file (or a saved model's block) was made with.

    Parameters
    ----------
    settings : ExtractionSettings
        What the file records (``ExtractionSettings.from_attrs``).
    weights : str, optional
        An explicit weights file; otherwise found as for extraction.

    Raises UsageError when the weights found are not the ones the features were made with.
    """
    from ..backbones import BACKBONES, get_backbone
    from ..settings import make_spec

    entry = BACKBONES.get(settings.backbone)
    if entry is not None and entry.preprocess != settings.preprocess:  # made by an older version
        raise UsageError(f"these features of '{settings.backbone}' were made with '{settings.preprocess}' "
                         f"preprocessing, which this version no longer applies to it (it uses "
                         f"'{entry.preprocess}'); extract them again with featurepipe extract ... --overwrite")
    backbone = get_backbone(settings.backbone, preprocess_mode=settings.preprocess)
    want = settings.weights_sha256
    spec, resolved = make_spec(backbone, layer=settings.layer or None, pooling=settings.pooling,
                               image_size=settings.image_size, resize=settings.resize,
                               augment=settings.augment, decode=settings.decode,
                               weights=weights if weights is not None else ("none" if not want else None))
    if spec.weights_sha256 != want:
        raise UsageError(f"the weights found for '{backbone.name}' ({spec.weights_source}, sha256 "
                         f"{spec.weights_sha256[:12]}...) are not the ones the features were made with "
                         f"(sha256 {want[:12]}...); pass --weights with that file")
    return FeatureModel(backbone, spec, resolved, engine=engine)
