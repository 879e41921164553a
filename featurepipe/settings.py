"""Extraction settings: everything that decides the numbers of a feature file, in one dataclass.

``ExtractionSettings`` is resolved once by ``make_spec`` (the backbone's defaults filled in, the
weights found and hashed, every value checked by ``check_settings``), written whole to a feature
file's attributes (``attrs``) and read back by verify, predict and fine-tuning
(``ExtractionSettings.from_attrs``, which also reads files written before a field existed).
Extract, the scikit-learn transformer, predict, verify and the Dask path all take it, so adding
a setting is one field here (with the default older files had) plus its use.

Run options that do not change the numbers (batch size, engine, decode threads, pixel cap, seed
and split fractions) are not settings: they are each stage's own arguments.
"""

from dataclasses import asdict, dataclass, fields, replace

from .backbones import POOLING_MODES, PREPROCESS, layer_names, resolve_weights
from .checks import check_image_size
from .errors import UsageError
from .reader import DEFAULT_DECODE, FILE_DECODE_DEFAULT, RESIZE_MODES, Target, check_decode

AUGMENT_MODES = ("none", "flip")
RANDOM_WEIGHTS = "random init (no weights)"


@dataclass(frozen=True)
class ExtractionSettings:
    """The resolved settings of one feature file (one network, one layer).

    Attributes
    ----------
    backbone : str
        Registry name or ``file:PATH``.
    layer : str
        The layer read ("" for the model's output); a tuple of names for one forward pass that
        reads several layers (``with_layers``; such a spec is never written as it is).
    pooling : str
        ``avg`` or ``max`` global pooling of a spatial map.
    image_size : int
        Input side in pixels.
    resize : str
        How an image becomes ``image_size`` square (``featurepipe.reader.RESIZE_MODES``).
    preprocess : str
        Pixel preprocessing mode (``featurepipe.backbones.PREPROCESS``).
    augment : str
        ``none``, or ``flip``: features averaged over the image and its mirror.
    decode : str
        How JPEGs are decoded (``featurepipe.reader.DECODE_MODES``).
    weights_source : str
        Where the weights came from (a record, not compared).
    weights_sha256 : str
        The weights file's hash ("" for random weights).
    """

    backbone: str
    layer: str
    pooling: str
    image_size: int
    resize: str
    preprocess: str
    augment: str
    decode: str
    weights_source: str
    weights_sha256: str

    def identity(self):
        """The settings a resumed or incremental run must share with the existing file."""
        return {k: v for k, v in asdict(self).items() if k != "weights_source"}

    def attrs(self):
        """Every field, as written to a feature file's attributes."""
        return asdict(self)

    def target(self, then=None):
        """The reader Target images are read with (size, resize, decode)."""
        return Target(int(self.image_size), self.resize, self.decode, then)

    @classmethod
    def from_attrs(cls, attrs):
        """The settings a feature file (or a saved model's block) records.

        Files written before a field existed get the value they were made with (``OLD_DEFAULTS``).
        """
        values = {}
        for f in fields(cls):
            if f.name in attrs:
                values[f.name] = attrs[f.name]
            elif f.name in OLD_DEFAULTS:
                values[f.name] = OLD_DEFAULTS[f.name]
            else:
                raise UsageError(f"the feature file records no '{f.name}' setting; extract it again "
                                 "with this version of featurepipe")
        values["image_size"] = int(values["image_size"])
        return cls(**{k: (v if k == "image_size" else str(v)) for k, v in values.items()})


# What files made before a field existed were made with.
OLD_DEFAULTS = {"layer": "", "pooling": "avg", "resize": "stretch", "augment": "none",
                "decode": FILE_DECODE_DEFAULT, "weights_source": "", "weights_sha256": ""}


def check_settings(*, pooling="avg", image_size=None, resize="stretch", augment="none",
                   preprocess=None, decode=DEFAULT_DECODE):
    """UsageError naming the option for any value no network accepts (the one place they are checked)."""
    if pooling not in POOLING_MODES:
        raise UsageError(f"unknown --pooling '{pooling}'; use avg or max")
    check_image_size(image_size)
    if resize not in RESIZE_MODES:
        raise UsageError(f"unknown --resize '{resize}'; use one of {', '.join(RESIZE_MODES)}")
    if augment not in AUGMENT_MODES:
        raise UsageError(f"unknown --augment '{augment}'; use flip (or none)")
    if preprocess is not None and preprocess not in PREPROCESS:
        raise UsageError(f"unknown --preprocess '{preprocess}'; use one of {', '.join(PREPROCESS)}")
    check_decode(decode)


def make_spec(backbone, *, layer=None, pooling="avg", image_size=None, resize="stretch",
              augment="none", weights=None, decode=DEFAULT_DECODE):
    """Resolve a backbone entry's settings, weights included.

    Parameters
    ----------
    backbone : featurepipe.backbones.Backbone
        From ``get_backbone`` (its preprocessing already chosen).
    layer, pooling, image_size, resize, augment, weights, decode
        As the extract options of the same names (None: the backbone's default).

    Returns
    -------
    (ExtractionSettings, ResolvedWeights or None)
    """
    check_settings(pooling=pooling, image_size=image_size, resize=resize, augment=augment, decode=decode)
    resolved = resolve_weights(backbone, weights)
    return ExtractionSettings(
        backbone=backbone.name,
        layer=layer or backbone.layer or "",
        pooling=pooling,
        image_size=int(image_size or backbone.input_size),
        resize=resize,
        preprocess=backbone.preprocess,
        augment=augment,
        decode=decode,
        weights_source=resolved.source if resolved else RANDOM_WEIGHTS,
        weights_sha256=resolved.sha256 if resolved else "",
    ), resolved


def with_layers(spec, layers):
    """The spec of ONE forward pass that reads several layers (``spec.layer`` becomes a tuple).

    Parameters
    ----------
    spec : ExtractionSettings
        From ``make_spec`` (its layer is the default taken for a ``None`` or empty name).
    layers : sequence of str

    Its feature model (``build_feature_model``, ``engines.FeatureModel``) returns one pooled output
    per layer, in this order; ``split_layers`` gives back each layer's own spec (what its file
    records). The layer tuple also keys the engines' caches, so a multi-layer model is converted
    and remembered apart from the single-layer ones.
    """
    names = tuple(name or spec.layer for name in layers)
    if not names:
        raise UsageError("no layers given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"layer '{repeated[0]}' is named twice; give each --layer once")
    return replace(spec, layer=names)


def split_layers(spec):
    """One single-layer ExtractionSettings per layer of a (multi-layer) spec."""
    return [replace(spec, layer=name) for name in layer_names(spec)]
