"""Building an engine by name, and ``auto``: every available engine timed once on this machine,
the fastest remembered in the cache."""

import json
import os
import platform
import warnings
from time import perf_counter

import numpy as np

from ..errors import FeaturepipeError, UsageError
from ..paths import cache_dir
from .base import DEFAULT_BATCH_SIZE, ModelSource, _digest, _write_atomic, model_key
from .registry import ENGINES, available_engines, check_engine_name

TRIAL_BATCH = DEFAULT_BATCH_SIZE  # images per timed batch in the auto trial
TRIAL_ROUNDS = 5                  # timed batches per engine (after one warm-up batch each)
# bump when an engine's speed changes, so auto re-times the engines instead of trusting old choices
# (3: choices are keyed by the set of available engines, so a new engine is timed too)
TRIAL_VERSION = 3


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
