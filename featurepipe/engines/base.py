"""The engine protocol, the lazily built model an engine runs, and the cache key of a converted model."""

import hashlib
import json
import os
import tempfile
from typing import Protocol, runtime_checkable

import numpy as np


CACHE_FORMAT = 2           # bump when the conversion changes, so old .tflite files are not reused
# Images per forward pass: the fastest of 1/4/8/16/32 for both engines and networks measured with
# ``python benchmarks/bench.py --sweep 1 4 8 16 32`` on 2 cores (docs/performance.md).
DEFAULT_BATCH_SIZE = 32


@runtime_checkable
class Engine(Protocol):
    """What ``FeatureModel``, extract and ``auto`` need from a forward-pass engine.

    An engine is built by its registry entry, ``ENGINES[name].make(model, spec)``, from a
    ``ModelSource`` (the Keras pixel model, built only if the engine asks for it) and an ExtractionSettings
    (or None), and raises UsageError for wrong arguments, FeaturepipeError when it cannot run that
    network. Whether it can be built at all on this machine is the entry's ``available()``.

    Attributes
    ----------
    name : str
        The registry key it was built under (what feature files record as ``engine``).
    dtype : numpy.dtype
        The input dtype it runs on (uint8 for pixel models); inputs are cast to it.
    """

    name: str
    dtype: np.dtype

    def run(self, batch):
        """Features of a batch.

        Parameters
        ----------
        batch : ndarray of shape (n, S, S, 3), uint8 RGB pixels (S = ``spec.image_size``)

        Returns
        -------
        ndarray of shape (n, D), float32
            Or a list of them, one per output in the Keras model's order, for a multi-layer model.
        """


@runtime_checkable
class PerImageEngine(Engine, Protocol):
    """An engine that also runs single images, from many threads at once (optional).

    Extract then calls ``run_one`` from ``parallel`` decode threads, so each image is decoded and
    run by the same thread while its pixels are still in the core's cache.

    Attributes
    ----------
    parallel : int
        How many threads should call ``run_one`` at once (extract's default decode threads).
    """

    parallel: int

    def run_one(self, image):
        """image : ndarray of shape (S, S, 3), uint8 -> ndarray of shape (D,), float32 (a list of
        them, one per output, for a multi-layer model); safe to call from several threads."""


class ModelSource:
    """A Keras feature model built at most once, when an engine first needs it.

    Parameters
    ----------
    build : callable
        ``build() -> keras.Model`` mapping a batch (n, S, S, 3) to features (n, D).
    """

    def __init__(self, build):
        self._build = build
        self._model = None

    @classmethod
    def wrap(cls, model):
        """A ModelSource for a Keras model, a ModelSource, or a zero-argument builder."""
        if isinstance(model, cls):
            return model
        if hasattr(model, "inputs"):
            return cls(lambda: model)
        return cls(model)

    @property
    def built(self):
        return self._model is not None

    def get(self):
        if self._model is None:
            self._model = self._build()
        return self._model


def tensorflow_version():
    """The installed TensorFlow's version, read from its package metadata (no 4 s import)."""
    from importlib import metadata

    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import tensorflow as tf

    return tf.__version__


def model_key(spec):
    """What a converted pixel model depends on, as a dict; None when it cannot be cached.

    Random weights (no ``weights_sha256``) differ at every build, so they are never cached.
    """
    if spec is None or not spec.weights_sha256:
        return None
    return {"backbone": spec.backbone, "layer": spec.layer, "pooling": spec.pooling,
            "image_size": int(spec.image_size), "preprocess": spec.preprocess,
            "weights_sha256": spec.weights_sha256,
            "tensorflow": tensorflow_version(), "format": CACHE_FORMAT}


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
