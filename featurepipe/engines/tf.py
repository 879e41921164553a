"""The ``tf`` engine: the Keras feature model's call compiled with ``tf.function``."""

import logging

import numpy as np

from ..backbones import import_tensorflow
from .base import ModelSource

class _OneTracePerModel(logging.Filter):
    """Drops TF's "triggered tf.function retracing" warning: each TFEngine compiles its own model's
    call once (fixed input signature), so several backbones in one run are several functions
    traced once each, not one function traced again and again."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


_ONE_TRACE_PER_MODEL = _OneTracePerModel()


class TFEngine:
    """TensorFlow: the Keras model's call compiled once with ``tf.function``."""

    name = "tf"

    def __init__(self, model, spec=None):
        import_tensorflow()
        import tensorflow as tf

        logging.getLogger("tensorflow").addFilter(_ONE_TRACE_PER_MODEL)  # once: filters are a set
        model = ModelSource.wrap(model).get()
        self.model = model
        shape, self.dtype = model.inputs[0].shape[1:], np.dtype(model.inputs[0].dtype)
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, *shape), tf.as_dtype(self.dtype))],
            reduce_retracing=True,
        )

    def run(self, batch):
        """batch : ndarray (n, ...) of the model's input dtype -> ndarray (n, D) float32, or a list
        of them (one per output, in the model's order) for a multi-layer model."""
        out = self._forward(np.asarray(batch, dtype=self.dtype))
        if isinstance(out, (list, tuple)):
            return [np.asarray(o, dtype=np.float32) for o in out]
        return np.asarray(out, dtype=np.float32)
