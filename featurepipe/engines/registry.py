"""The ``ENGINES`` registry: one ``EngineKind`` entry per engine (adding an engine is a class and
one entry here)."""

from dataclasses import dataclass
from typing import Callable


from ..errors import UsageError
from .litert import LiteRTEngine, litert_available
from .tf import TFEngine

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
        One line for ``--help`` and docs/backbones.md.
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
