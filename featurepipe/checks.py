"""Argument checks shared by the library functions and their CLIs (one rule per argument).

Each raises ``UsageError`` with one line naming the option, the value and the accepted range.
"""

import math
import numbers

from .errors import UsageError

MAX_SEED = 2**32 - 1      # numpy and scikit-learn accept seeds in [0, 2**32 - 1]
MIN_IMAGE_SIZE = 32       # the smallest input every registry network accepts (some need more)
MAX_IMAGE_SIZE = 2048     # larger inputs only exhaust memory: one image is 12 MB of pixels


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed, option="--seed"):
    """Seeds are integers in [0, 2**32 - 1] in every stage (extract, fit, compare, verify, finetune)."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def check_at_least(value, low, option):
    """An integer option with a lower bound (``None`` means the default and is accepted)."""
    if value is not None and (not _is_int(value) or value < low):
        raise UsageError(f"{option} must be >= {low}, got {value!r}")
    return value


def check_n_jobs(n_jobs, option="--n-jobs"):
    """joblib's convention: a count >= 1, or -1 (all cores), -2 (all but one), ...; never 0."""
    if not _is_int(n_jobs) or n_jobs == 0:
        raise UsageError(f"{option} must be a number of parallel jobs >= 1, or -1 for every core, got {n_jobs!r}")
    return int(n_jobs)


MAX_WORKERS = 256  # threads; far more than any machine needs, few enough to start at once


def check_workers(workers, option="--workers"):
    """``None`` (the default: one per core) or a count in [1, MAX_WORKERS]."""
    if workers is not None and (not _is_int(workers) or not 1 <= workers <= MAX_WORKERS):
        raise UsageError(f"{option} must be from 1 to {MAX_WORKERS} (leave it out for the default), "
                         f"got {workers!r}")
    return workers


def check_image_size(size):
    """``None`` (the backbone's size) or a size in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]."""
    if size is not None and (not _is_int(size) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE):
        raise UsageError(f"--image-size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
                         f"pixels, got {size!r}")
    return size


def check_tolerance(tolerance, option="--tolerance"):
    """A finite number >= 0."""
    if not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) or tolerance < 0:
        raise UsageError(f"{option} must be a finite number >= 0, got {tolerance!r}")
    return float(tolerance)
