"""Memory and time planned before a fit, not discovered by the kernel's OOM killer.

Each classifier knows the cost of one fit from the data's shape (``ClassifierSpec.cost_for``:
peak bytes and rough seconds, fitted to measurements in docs/fit.md). ``plan_fit`` turns that into
the cost of a whole row (the grid search's parallel fits on the search rows, then the refit on
all training rows, calibration included); ``check_plans`` refuses, before anything is fitted, a
row that cannot fit into the memory this process may use (``available_memory``: the cgroup limit,
the machine's free memory, or ``FEATUREPIPE_MEMORY`` — e.g. ``8G`` — when set), with one line
that names the fix.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

GB = 1 << 30
SAFETY = 0.8               # plan to use at most this share of the available memory
BIG_SECONDS = 120          # a plan this long (or BIG_BYTES this large) is printed before it starts
BIG_BYTES = 2 * GB

# Rough machine speeds behind the time estimates (2-core machine, docs/fit.md "Classifiers at
# scale"): float32 BLAS products, and the loops of liblinear / libsvm / trees.
BLAS_FLOPS = 2.0e10
LOOP_FLOPS = 1.0e9


@dataclass(frozen=True)
class Cost:
    """Peak memory (bytes, beyond the input matrix) and rough time (seconds) of one fit."""

    memory: float
    seconds: float


def parse_bytes(text, option="FEATUREPIPE_MEMORY"):
    """``"8G"``, ``"512M"``, ``"1.5T"`` or a plain number of bytes -> int."""
    value = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": GB, "T": 1 << 40}.get(value[-1:], 1)
    number = value[:-1] if scale != 1 else value
    try:
        out = int(float(number) * scale)
    except ValueError:
        out = 0
    if out <= 0:
        raise UsageError(f"{option} must be a size such as 8G or 512M, got {text!r}")
    return out


def _cgroup_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _mem_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory():
    """Bytes this process may plan with: ``FEATUREPIPE_MEMORY`` when set, else the smaller of the
    cgroup limit and the machine's available memory (MemAvailable)."""
    if os.environ.get("FEATUREPIPE_MEMORY", "").strip():
        return parse_bytes(os.environ["FEATUREPIPE_MEMORY"])
    known = [m for m in (_cgroup_limit(), _mem_available()) if m]
    return min(known) if known else 16 * GB


@dataclass(frozen=True)
class RowPlan:
    """The plan of one (feature set, classifier) row.

    ``memory`` is the estimated peak of the whole row (the input matrix, the training copy and the
    parallel fits); ``seconds`` the estimated wall time; ``note`` the size-dependent choices.
    """

    features: str
    clf: str
    n_train: int
    n_features: int
    n_classes: int
    search_rows: int
    memory: float
    seconds: float
    note: str = ""
    refit_memory: float = 0.0  # the part a cluster cannot take: the refit runs in this process

    def line(self):
        return (f"{self.features} / {self.clf}: {self.n_train:,} train rows x {self.n_features:,} features, "
                f"~{_size(self.memory)} peak, ~{_duration(self.seconds)}"
                + (f" ({self.note})" if self.note else ""))


def plan_fit(spec, *, features, n_train, n_features, n_classes, n_candidates, folds, search_rows,
             n_jobs, calibrated, input_bytes=0, train_view=False):
    """The RowPlan of one fit: the search's parallel fits, then the refit on all training rows.

    Parameters
    ----------
    spec : ClassifierSpec
    n_train, n_features, n_classes : int
        The training rows' shape.
    n_candidates, folds : int
        Grid size and CV folds.
    search_rows : int
        Rows the grid search uses (all training rows, or the stratified subsample).
    n_jobs : int
        Parallel fits (already resolved to a positive count).
    calibrated : bool
        The refit is ``CalibratedClassifierCV`` (3 extra fits on 2/3 of the rows).
    input_bytes : int
        The feature matrix still to be read (counted once).
    train_view : bool
        The training rows are a view of the matrix (compare), not a copy.
    """
    fold_rows = max(2, search_rows * (folds - 1) // folds)
    one = spec.cost_for(n_samples=fold_rows, n_features=n_features, n_classes=n_classes)
    final = spec.cost_for(n_samples=n_train, n_features=n_features, n_classes=n_classes)
    train_copy = 0.0 if train_view else 4.0 * n_train * n_features
    if one is None or final is None:
        return RowPlan(features, spec.name, n_train, n_features, n_classes, search_rows,
                       input_bytes + 2 * train_copy, 0.0, "cost unknown")
    fits = n_candidates * folds
    parallel = max(1, min(n_jobs, fits))
    search_memory = parallel * (one.memory + 4.0 * search_rows * n_features)
    search_seconds = fits * one.seconds / parallel
    refit_seconds = final.seconds * (1 + (2.0 if calibrated else 0.0))
    memory = input_bytes + train_copy + max(search_memory, final.memory)
    note = spec.note_for(n_samples=n_train, n_features=n_features)
    return RowPlan(features, spec.name, n_train, n_features, n_classes, search_rows, memory,
                   search_seconds + refit_seconds, note, input_bytes + train_copy + final.memory)


def check_plans(plans, *, available=None, dask=None):
    """Raise UsageError when any row's plan exceeds the memory budget.

    The one line names every row that cannot fit and the fix: the requested classifiers whose rows
    all fit (else logreg or knn), fewer files, or --dask when only the search is too big.
    """
    available = available_memory() if available is None else available
    budget = SAFETY * available
    over = [p for p in plans if p.memory > budget]
    if over:
        fitting = [c for c in dict.fromkeys(p.clf for p in plans) if c not in {p.clf for p in over}]
        raise UsageError(_refusal(over, fitting, budget, dask))


def _refusal(over, fitting, budget, dask):
    cheaper = [c for c in ("logreg", "knn", "nb") if c not in {p.clf for p in over}]
    fix = (f"use --clf {' '.join(fitting)}" if fitting else f"use --clf {' or '.join(cheaper)}" if cheaper
           else "use a machine with more memory (FEATUREPIPE_MEMORY=SIZE if more is free than seen)")
    exact_rbf = [p for p in over if p.clf == "svm-rbf" and "nystroem" not in p.note]
    if exact_rbf:  # the exact kernel: the Nystroem map is the bounded variant
        smallest = min(p.n_train for p in exact_rbf)
        fix = f"lower FEATUREPIPE_EXACT_RBF_MAX_ROWS below {smallest} (Nystroem), or {fix}"
    # --dask moves the search's fits, not the refit on all rows
    searches_only = not dask and all(p.refit_memory <= budget for p in over)
    where = ", or run the grid on a cluster with --dask tcp://HOST:8786" if searches_only else ""
    rows = "; ".join(f"{p.features} / {p.clf} needs ~{_size(p.memory)} for {p.n_train:,} rows x "
                     f"{p.n_features:,} features" + (f" ({p.note})" if p.note else "") for p in over)
    return (f"{rows}; ~{_size(budget)} is available: {fix}, pass fewer --features files{where} "
            f"(nothing was fitted)")


def announce(plans, *, file=None):
    """Print the plan when it is big (any row over BIG_BYTES, or all rows over BIG_SECONDS)."""
    plans = list(plans)
    if not plans:
        return
    if max(p.memory for p in plans) < BIG_BYTES and sum(p.seconds for p in plans) < BIG_SECONDS:
        return
    out = file or sys.stderr
    print(f"plan: {len(plans)} rows, ~{_duration(sum(p.seconds for p in plans))} in all (rough), "
          f"{_size(available_memory())} available", file=out)
    for p in plans:
        print(f"  {p.line()}", file=out)


def _size(n):
    if n >= GB / 10:
        return f"{n / GB:.1f} GB"
    return f"{n / (1 << 20):.0f} MB" if n >= 1 << 20 else f"{n / 1024:.0f} KB"


def _duration(seconds):
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{max(seconds, 1):.0f} s"
