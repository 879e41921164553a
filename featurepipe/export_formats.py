"""The file formats ``featurepipe export`` writes: ``FORMATS`` maps a name to an ``ExportFormat``
(how to write a Keras classifier to it, how to run the file on the format's own runtime).
A new format is one writer, one runner and one entry.
"""

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .store import write_bytes_atomic


def _write_tflite(model, path, *, quantize=None, representative=None):
    """The ``.tflite`` of ``model``: float32, or ``float16`` / ``int8`` weights (int8: activations
    calibrated on ``representative`` uint8 batches, float kernels where an op has no int8 one)."""
    from .backbones import import_tensorflow
    from .engines import convert_to_tflite

    if quantize is None:
        content = convert_to_tflite(model)
    else:
        import_tensorflow()
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        else:
            converter.representative_dataset = lambda: ([batch[None]] for batch in representative)
        content = converter.convert()
    write_bytes_atomic(path, content)


def _run_tflite(path):
    """A function uint8 (n, S, S, 3) -> float32 (n, C) on the LiteRT interpreter."""
    from .engines.litert import _drop_native_info, _litert_interpreter

    it = _litert_interpreter()(model_path=str(path), num_threads=os.cpu_count() or 1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]], strict=True)
    with _drop_native_info():
        it.allocate_tensors()

    def run(batch):
        rows = []
        for image in batch:
            it.set_tensor(inp["index"], np.ascontiguousarray(image[None], dtype=inp["dtype"]))
            it.invoke()
            rows.append(it.get_tensor(out["index"])[0].astype(np.float32))
        return np.stack(rows)

    return run


def _write_savedmodel(model, path, *, quantize=None, representative=None):
    import contextlib
    import io

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        model.export(str(tmp), format="tf_saved_model", verbose=False)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _run_savedmodel(path):
    from .backbones import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return lambda batch: np.asarray(loaded.serve(tf.constant(batch, tf.uint8)), dtype=np.float32)


@dataclass(frozen=True)
class ExportFormat:
    """One file format: how to write a Keras classifier to it and how to run the file.

    ``write(model, path, quantize=, representative=)``; ``runner(path) -> fn`` with ``fn(uint8
    (n, S, S, 3)) -> float32 (n, C)`` on the format's own runtime (``runtime`` names it).
    """

    name: str
    suffix: str
    write: Callable
    runner: Callable
    runtime: str
    quantize: tuple = ()
    metadata: bool = False


FORMATS = {
    "tflite": ExportFormat("tflite", ".tflite", _write_tflite, _run_tflite, "LiteRT interpreter (ai-edge-litert)",
                           quantize=("float16", "int8"), metadata=True),
    "savedmodel": ExportFormat("savedmodel", "", _write_savedmodel, _run_savedmodel,
                               "TensorFlow (tf.saved_model.load)"),
}


