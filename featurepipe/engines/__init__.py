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

Adding an engine is a class following ``Engine`` (a module of this package) and one ``ENGINES``
entry in ``registry.py``. Modules: ``base`` (the protocol, ``ModelSource``, cache keys), ``tf``,
``litert``, ``registry``, ``choice`` (``make_engine`` and ``auto``), ``model`` (``FeatureModel``).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .base import (CACHE_FORMAT, DEFAULT_BATCH_SIZE, Engine, ModelSource, PerImageEngine,  # noqa: E402
                   model_key, tensorflow_version)
from .choice import (TRIAL_BATCH, TRIAL_ROUNDS, TRIAL_VERSION, auto_choice_without_building,  # noqa: E402
                     choose_engine, machine_id, make_engine, pick_engine, remembered_choice, time_engines)
from .litert import LiteRTEngine, cached_tflite, convert_to_tflite, litert_available, tflite_path  # noqa: E402
from .model import FeatureModel, pixel_model, rebuild_feature_model  # noqa: E402
from .registry import (ENGINE_CHOICES, ENGINES, EngineKind, available_engines,  # noqa: E402
                       check_engine_name, engine_choices)
from .tf import TFEngine  # noqa: E402

__all__ = ["CACHE_FORMAT", "DEFAULT_BATCH_SIZE", "ENGINES", "ENGINE_CHOICES", "Engine", "EngineKind",
           "FeatureModel", "LiteRTEngine", "ModelSource", "PerImageEngine", "TFEngine", "TRIAL_BATCH",
           "TRIAL_ROUNDS", "TRIAL_VERSION", "auto_choice_without_building", "available_engines",
           "cached_tflite", "check_engine_name", "choose_engine", "convert_to_tflite", "engine_choices",
           "litert_available", "machine_id", "make_engine", "model_key", "pick_engine", "pixel_model",
           "rebuild_feature_model", "remembered_choice", "tensorflow_version", "tflite_path", "time_engines"]
