"""Forward-pass engines and the FeatureModel that ties a backbone, its settings and an engine.

An engine (the ``Engine`` protocol) runs a feature model on a batch of pixels and has a ``name``.
``FeatureModel`` gives its engine ``pixel_model``: RGB pixels (n, S, S, 3) uint8 -> preprocessing
-> network -> pooling -> features (n, D) float32, all in one graph (numpy preprocessing in the main
thread cost as much CPU as JPEG decoding). ``ENGINES`` maps an engine name to its ``EngineKind``
entry; ``make_engine(name, model, spec)`` builds one:

* ``tf``: the Keras feature model's call compiled with ``tf.function``;
* ``litert``: the whole feature model (pooling included) converted once to a ``.tflite`` file,
  cached under ``cache_dir()`` and run by LiteRT's CPU (XNNPACK) kernels (``pip install
  featurepipe[litert]``);
* ``auto``: the fastest available engine for that network on this machine, found by a short timed
  trial of every available engine (each entry's ``preference`` weighs its rate: LiteRT wins within
  5 %) that is remembered in the cache.

Adding an engine is a class following ``Engine`` and one ``ENGINES`` entry.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from .backbones import PREPROCESS, build_feature_model, file_digest, import_tensorflow
from .errors import FeaturepipeError, UsageError
from .paths import cache_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CACHE_FORMAT = 2           # bump when the conversion changes, so old .tflite files are not reused
# Images per forward pass: the fastest of 1/4/8/16/32 for both engines and networks measured with
# ``python benchmarks/bench.py --sweep 1 4 8 16 32`` on 2 cores (see the README's Performance).
DEFAULT_BATCH_SIZE = 32
TRIAL_BATCH = DEFAULT_BATCH_SIZE  # images per timed batch in the auto trial
TRIAL_ROUNDS = 5                  # timed batches per engine (after one warm-up batch each)
# bump when an engine's speed changes, so auto re-times the engines instead of trusting old choices
# (3: choices are keyed by the set of available engines, so a new engine is timed too)
TRIAL_VERSION = 3


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


# --------------------------------------------------------------------------- tf


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


# --------------------------------------------------------------------------- litert


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


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------- registry and auto


@dataclass(frozen=True)
class EngineKind:
    """One registry entry: how to build an engine, whether it can run here, how ``auto`` weighs it.

    Parameters
    ----------
    make : callable
        ``make(model, spec) -> Engine``; ``model`` is a ModelSource (call ``model.get()`` for the
        Keras model, only when needed), ``spec`` an ExtractionSettings or None (None: cache nothing).
        Raises UsageError for a wrong argument, FeaturepipeError when it cannot run this network
        (``auto`` then warns and leaves it out).
    available : callable
        ``available() -> bool``: can this engine be built on this machine (its package installed)?
        Cheap, never builds a model.
    description : str
        One line for ``--help`` and the README.
    preference : float, default=1.0
        ``auto`` keeps the engine with the highest ``images per second x preference``: 1.05 wins
        against a faster engine with 1.0 unless that one is more than 5 % faster.
    """

    make: Callable
    available: Callable[[], bool]
    description: str
    preference: float = 1.0


ENGINES = {
    "tf": EngineKind(make=TFEngine, available=lambda: True,
                     description="TensorFlow tf.function (always available)"),
    # LiteRT also starts faster (no TensorFlow import, no Keras build once its conversion is cached)
    "litert": EngineKind(make=LiteRTEngine, available=litert_available,
                         description="LiteRT XNNPACK CPU kernels on a cached .tflite conversion",
                         preference=1.05),
}


def engine_choices():
    """The names ``--engine`` accepts: ``auto`` and every registered engine, in registry order."""
    return ("auto", *ENGINES)


ENGINE_CHOICES = engine_choices()  # as the module was imported; engine_choices() sees later entries


def available_engines():
    """Names of the registered engines that can run on this machine, in registry order."""
    return [name for name, kind in ENGINES.items() if kind.available()]


def check_engine_name(name):
    """UsageError naming the known engines unless ``name`` is ``auto`` or a registered engine."""
    if name not in engine_choices():
        raise UsageError(f"unknown engine '{name}'; use one of {', '.join(engine_choices())}")


def make_engine(name, model, spec):
    """Build the engine ``name`` (``auto`` or a key of ``ENGINES``) for a feature model.

    Parameters
    ----------
    name : str
    model : keras.Model, ModelSource or callable
        The feature model, or a zero-argument function building it (only called when needed:
        a cached LiteRT model needs no Keras model).
    spec : ExtractionSettings or None
        Keys the cache; None disables caching.

    Returns
    -------
    Engine
        Its ``name`` is the engine really built (never ``auto``).
    """
    check_engine_name(name)
    if name == "auto":
        return choose_engine(model, spec)
    return ENGINES[name].make(ModelSource.wrap(model), spec)


def machine_id():
    """CPU model, core count and platform: engine speed depends on them."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()} {platform.machine()} {platform.system()}"


def _choices_path():
    return cache_dir() / "engine-choices.json"


def _choice_key(key, candidates):
    """A new engine (registered or installed) is a new key, so ``auto`` times it too."""
    return _digest({**key, "machine": machine_id(), "trial": TRIAL_VERSION, "engines": sorted(candidates)})


def remembered_choice(spec):
    """What ``auto`` chose before for ``spec`` among the engines available now on this machine.

    Returns
    -------
    dict or None
        ``{"engine": name, "images_per_second": {name: rate}, "machine": str, "batch": int}``, as
        stored in ``engine-choices.json``; None when never timed (or ``spec`` is not cacheable).
    """
    key = model_key(spec)
    if key is None:
        return None
    try:
        choices = json.loads(_choices_path().read_text())
    except (OSError, ValueError):
        return None
    return choices.get(_choice_key(key, available_engines()))


def auto_choice_without_building(spec):
    """The engine ``auto`` would use for ``spec`` without building or timing anything, or None.

    The only available engine, else the remembered choice when it is still registered.
    """
    candidates = available_engines()
    if len(candidates) == 1:
        return candidates[0]
    remembered = (remembered_choice(spec) or {}).get("engine")
    return remembered if remembered in candidates else None


def _remember(spec, candidates, record):
    key = model_key(spec)
    if key is None:
        return
    path = _choices_path()
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):
        choices = {}
    choices[_choice_key(key, candidates)] = record
    _write_atomic(path, json.dumps(choices, indent=1, sort_keys=True).encode())


def _trial_batch(model, spec):
    rng = np.random.default_rng(0)
    if spec is not None:
        s = spec.image_size
        return rng.integers(0, 256, (TRIAL_BATCH, s, s, 3), dtype=np.uint8)
    shape = ModelSource.wrap(model).get().inputs[0].shape[1:]
    return rng.uniform(0, 255, (TRIAL_BATCH, *shape)).astype(np.float32)


def time_engines(engines, batch, rounds=TRIAL_ROUNDS):
    """Images per second of each engine on ``batch``: best of ``rounds`` runs, interleaved.

    Interleaving spreads any load from other programs over all engines alike.

    Parameters
    ----------
    engines : dict of name -> Engine
    batch : ndarray of shape (n, S, S, 3), uint8
    rounds : int

    Returns
    -------
    dict of name -> float
    """
    for engine in engines.values():
        engine.run(batch)  # warm-up: compile, allocate
    best = {name: float("inf") for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = perf_counter()
            engine.run(batch)
            best[name] = min(best[name], perf_counter() - start)
    return {name: len(batch) / max(seconds, 1e-9) for name, seconds in best.items()}


def pick_engine(rates):
    """The name with the highest ``rate x preference`` (the higher preference on a tie).

    rates : dict of engine name -> images per second
    """
    return max(rates, key=lambda name: (rates[name] * ENGINES[name].preference, ENGINES[name].preference))


def _build_candidates(source, spec, names):
    """The engines of ``names`` that build for this network; the others are warned about."""
    built = {}
    for name in names:
        try:
            built[name] = ENGINES[name].make(source, spec)
        except UsageError:  # a wrong argument (--layer, --image-size): not a reason to try another engine
            raise
        except FeaturepipeError as err:
            warnings.warn(f"{err}; auto leaves the {name} engine out", stacklevel=3)
    if not built:
        raise FeaturepipeError(f"no engine can run this network (tried {', '.join(names)})")
    return built


def choose_engine(model, spec):
    """The fastest available engine for this network on this machine, as a built Engine.

    The first call builds every available engine, times them on a few batches (``time_engines``)
    and remembers the winner (``pick_engine``) under ``cache_dir()``; later calls only build the
    winner. An engine that cannot convert the network is left out with a warning; a single
    available engine is used without timing.
    """
    source = ModelSource.wrap(model)
    remembered = auto_choice_without_building(spec)
    if remembered is not None:
        return ENGINES[remembered].make(source, spec)
    candidates = _build_candidates(source, spec, available_engines())
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    rates = time_engines(candidates, _trial_batch(source, spec))
    winner = pick_engine(rates)
    _remember(spec, available_engines(),
              {"engine": winner, "images_per_second": {k: round(v, 1) for k, v in rates.items()},
               "machine": machine_id(), "batch": TRIAL_BATCH})
    return candidates[winner]


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
    from .backbones import get_backbone
    from .settings import make_spec

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
