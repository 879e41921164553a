"""The ``litert`` engine: the feature model converted once to a cached ``.tflite`` file and run by
LiteRT's XNNPACK CPU kernels, one single-threaded interpreter per core."""

import contextlib
import hashlib
import io
import os
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backbones import file_digest, import_tensorflow
from ..errors import FeaturepipeError, UsageError
from ..paths import cache_dir
from .base import ModelSource, _digest, _write_atomic, model_key

def _litert_interpreter():
    """LiteRT's Interpreter class; UsageError naming the install command when it is missing."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise UsageError(f"the litert engine needs ai-edge-litert ({err}); pip install "
                         "'featurepipe[litert]' or use --engine tf") from None
    return Interpreter


def litert_available():
    """True when LiteRT can be imported."""
    try:
        _litert_interpreter()
    except UsageError:
        return False
    return True


def tflite_path(spec):
    """Where the converted model of ``spec`` is cached (None when it is not cacheable)."""
    key = model_key(spec)
    if key is None:
        return None
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in spec.backbone.split("/")[-1])
    return cache_dir() / "litert" / f"{stem}-{spec.image_size}-{spec.pooling}-{_digest(key)}.tflite"


def convert_to_tflite(model):
    """The ``.tflite`` bytes of a Keras model (float32, batch dimension left free)."""
    import_tensorflow()
    import tensorflow as tf

    try:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return converter.convert()
    except Exception as err:
        raise FeaturepipeError(f"cannot convert '{model.name}' to LiteRT ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); use --engine tf") from None


def cached_tflite(model, spec):
    """The converted model: ``(path, None)`` from the cache (converting on a miss), or
    ``(None, bytes)`` when ``spec`` cannot be cached."""
    path = tflite_path(spec)
    if path is None:
        return None, convert_to_tflite(ModelSource.wrap(model).get())
    if not _intact(path):
        if path.exists():
            warnings.warn(f"the cached LiteRT model '{path}' is not the one featurepipe converted "
                          "(its sha256 differs from the one recorded); converting it again", stacklevel=3)
        content = convert_to_tflite(ModelSource.wrap(model).get())
        _write_atomic(path, content)
        _write_atomic(_digest_path(path), hashlib.sha256(content).hexdigest().encode())
    return path, None


def _digest_path(path):
    return path.with_name(path.name + ".sha256")


def _intact(path):
    """True when ``path`` holds the bytes whose sha256 was recorded when it was converted."""
    try:
        return file_digest(path) == _digest_path(path).read_text().strip()
    except OSError:
        return False


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _drop_native_info():
    """Hide the native 'INFO: Created TensorFlow Lite XNNPACK delegate' line; keep other output.

    File descriptor 2 is process-wide: threads creating interpreters at once take turns, or one
    would save the other's capture file as "the" stderr and every later message would be lost.
    """
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(True)
                    if not line.startswith("INFO: ")]
            if kept:
                sys.stderr.write("".join(kept))


class LiteRTEngine:
    """LiteRT (TensorFlow Lite) with its XNNPACK CPU kernels, on the cached converted model.

    A batch is split over ``parallel`` interpreters (default: one per core), each single-threaded,
    in its own thread, invoked one image at a time. On 2 cores that beat one interpreter using both
    cores on whole batches by 15-60 % (``bench.py --sweep``: SqueezeNet 280-297 vs 190-245 img/s,
    MobileNetV2 330-346 vs 210-290): no barrier between the cores inside each layer, and one image's activations stay in
    cache. LiteRT releases the GIL while it computes. Calls from several threads take turns.

    Parameters
    ----------
    model : keras.Model or ModelSource
    spec : ExtractionSettings or None
        Keys the ``.tflite`` cache (None: convert in memory, no cache).
    parallel : int or None
        Interpreters run side by side (None: ``os.cpu_count()``).
    num_threads : int
        Threads inside each interpreter.
    """

    name = "litert"

    def __init__(self, model, spec=None, *, parallel=None, num_threads=1):
        self._interpreter_class = _litert_interpreter()
        self.path, self._content = cached_tflite(model, spec)
        self.parallel = max(1, parallel or os.cpu_count() or 1)
        self.num_threads = num_threads
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool = None
        self.dtype = self._interpreter()[3]

    def _interpreter(self):
        """This thread's interpreter, planned for one image: (interpreter, in index, out index, dtype)."""
        cached = getattr(self._local, "interpreter", None)
        if cached is not None:
            return cached
        source = {"model_path": str(self.path)} if self.path else {"model_content": self._content}
        it = self._interpreter_class(num_threads=self.num_threads, **source)
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]], strict=True)
        with _drop_native_info():
            it.allocate_tensors()
        self._local.interpreter = (it, inp["index"], _output_indices(it), inp["dtype"])
        return self._local.interpreter

    def _run_images(self, images):
        it, inp, outs, _ = self._interpreter()
        features = [[] for _ in outs]
        for k in range(len(images)):
            it.set_tensor(inp, images[k:k + 1])
            it.invoke()
            for rows, out in zip(features, outs):
                rows.append(it.get_tensor(out).reshape(-1))
        arrays = [np.stack(rows).astype(np.float32, copy=False) for rows in features]
        return arrays if len(arrays) > 1 else arrays[0]

    def run_one(self, image):
        """image : ndarray (...) -> features ndarray (D,) float32 (a list, one per output, for a
        multi-layer model), on the calling thread's own interpreter (no lock: threads never share
        one). Extract calls it from its decode threads, so each image is decoded and run by the
        same thread while its data is still in cache."""
        out = self._run_images(np.ascontiguousarray(image[None], dtype=self.dtype))
        return [o[0] for o in out] if isinstance(out, list) else out[0]

    def run(self, batch):
        """batch : ndarray (n, ...) of the model's input dtype -> ndarray (n, D) float32, or a list
        of them (one per output, in the Keras model's order) for a multi-layer model."""
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        with self._lock:
            if self.parallel == 1 or len(batch) == 1:
                return self._run_images(batch)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="featurepipe-litert")
                weakref.finalize(self, self._pool.shutdown, wait=False)
            parts = np.array_split(batch, min(self.parallel, len(batch)))
            slices = list(self._pool.map(self._run_images, parts))
            if isinstance(slices[0], list):
                return [np.concatenate(parts) for parts in zip(*slices)]
            return np.concatenate(slices)


def _output_indices(interpreter):
    """Tensor indices of the outputs in the Keras model's order.

    ``get_output_details()`` lists a converted model's outputs in no particular order; its
    signature names them ``output_0``, ``output_1``, ... in the order of the Keras outputs.
    """
    try:
        details = interpreter.get_signature_runner().get_output_details()
    except ValueError:  # no signature: a single-output model converted elsewhere
        return [interpreter.get_output_details()[0]["index"]]
    names = sorted(details, key=lambda n: int(n.rsplit("_", 1)[-1]) if n.rsplit("_", 1)[-1].isdigit() else 0)
    return [details[n]["index"] for n in names]
