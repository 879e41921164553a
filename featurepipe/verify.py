"""Verify a feature file: re-extract a random sample of rows and compare with the stored features.

``python -m featurepipe.verify FILE.h5 [--sample K]`` rebuilds the file's feature model from its
attributes (on the TF engine), decodes the sampled rows' image files again and compares. A row
whose image is gone or changed, or whose stored features differ from a fresh extraction
(misaligned rows, an edited file, engine drift), is named, and the command exits with code 1.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from .checks import check_at_least, check_seed, check_tolerance
from .engines import rebuild_feature_model
from .errors import DataError, ImageError, UsageError
from .reader import read_images
from .settings import ExtractionSettings
from .store import iter_feature_blocks, load

DEFAULT_TOLERANCE = 1e-4
EXTRACT_SAMPLE = 4


@dataclass(frozen=True)
class Mismatch:
    """One row that failed: its index in the file, its image path and why."""

    row: int
    path: str
    reason: str

    def __str__(self):
        return f"row {self.row} ({self.path}): {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` checked.

    Attributes
    ----------
    path : Path
    rows : ndarray of shape (n_checked,), int64
        The rows re-extracted, sorted.
    errors : ndarray of shape (n_checked,), float64
        Relative error per row: max |stored - fresh| / max |fresh| (nan when the image is unreadable).
    mismatches : list of Mismatch
    tolerance : float
    """

    path: Path
    rows: np.ndarray
    errors: np.ndarray
    mismatches: list
    tolerance: float

    @property
    def ok(self):
        return not self.mismatches

    def summary(self):
        worst = np.nanmax(self.errors) if np.isfinite(self.errors).any() else float("nan")
        state = "ok" if self.ok else f"{len(self.mismatches)} MISMATCHED"
        return (f"{self.path.name}: {len(self.rows)} rows re-extracted, {state} "
                f"(largest relative error {worst:.1e}, tolerance {self.tolerance:.0e})")


def sample_rows(n_rows, sample, seed):
    """``sample`` distinct random rows of ``n_rows`` (all of them when sample is 0), sorted."""
    if sample <= 0 or sample >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=sample, replace=False)).astype(np.int64)


def relative_errors(stored, fresh):
    """Per row: max |stored - fresh| / max |fresh| (0 when both are all zero).

    stored, fresh : ndarray of shape (n, D) -> ndarray of shape (n,), float64
    """
    stored = np.asarray(stored, dtype=np.float64)
    fresh = np.asarray(fresh, dtype=np.float64)
    diff = np.abs(stored - fresh).max(axis=1)
    scale = np.abs(fresh).max(axis=1)
    return np.where(diff == 0, 0.0, diff / np.maximum(scale, 1e-12))


def verify(path, *, sample=32, seed=0, data=None, weights=None, tolerance=DEFAULT_TOLERANCE,
           batch_size=32):
    """Re-extract ``sample`` random rows of a feature file on the TF engine and compare.

    Parameters
    ----------
    path : str or Path
        A feature file written by ``featurepipe.extract``.
    sample : int
        Number of random rows to check; 0 checks every row.
    seed : int
        Picks the rows.
    data : str or Path, optional
        The image folder, when it moved since extraction (default: the file's ``data_root``).
    weights : str, optional
        The weights file, when it is not found as for extraction.
    tolerance : float
        Largest accepted relative error per row.

    Returns
    -------
    VerifyResult
    """
    check_at_least(sample, 0, "--sample")
    check_seed(seed)
    check_tolerance(tolerance)
    check_at_least(batch_size, 1, "--batch-size")
    path = Path(path)
    f = load(path, features=False)
    attrs = f.attrs
    if not str(attrs.get("weights_sha256", "")):
        raise DataError(f"'{path}' was made with random weights (no weights_sha256): its features "
                        "cannot be reproduced, so there is nothing to verify")
    root = Path(data) if data is not None else Path(str(attrs.get("data_root", "")))
    if not root.is_dir():
        if data is not None:
            raise UsageError(f"--data '{data}' is not a folder; pass the image folder '{path.name}' was extracted from")
        raise DataError(f"the image folder recorded in '{path}' ({root}) is gone; pass its new place with --data")
    rows = sample_rows(len(f), sample, seed)
    settings = ExtractionSettings.from_attrs(attrs)
    model = rebuild_feature_model(settings, engine="tf", weights=weights)
    target = settings.target()
    mismatches, errors = [], np.full(len(rows), np.nan)
    at = {int(r): i for i, r in enumerate(rows)}
    for block_rows, stored in iter_feature_blocks(path, rows, block=batch_size):
        images, good = [], []
        reads = read_images([str(root / f.paths[r]) for r in block_rows.tolist()], [target])
        for k, (r, read) in enumerate(zip(block_rows.tolist(), reads)):
            problem, rgb = _check_read(root, read, f.sha1[r] if f.sha1 is not None else None)
            if problem:
                mismatches.append(Mismatch(r, f.paths[r], problem))
            else:
                images.append(rgb)
                good.append(k)
        if images:
            err = relative_errors(stored[good], model(np.stack(images)))
            for k, e in zip(good, err):
                r = int(block_rows[k])
                errors[at[r]] = e
                if not e <= tolerance:
                    mismatches.append(Mismatch(r, f.paths[r], f"stored features differ from a fresh "
                                                             f"extraction (relative error {e:.1e})"))
    return VerifyResult(path=path, rows=rows, errors=errors,
                        mismatches=sorted(mismatches, key=lambda m: m.row), tolerance=tolerance)


def _check_read(root, read, sha1):
    """(problem or None, rgb) for one row's image."""
    if isinstance(read, ImageError):
        return f"cannot read its image under '{root}': {read}", None
    if sha1 and read.sha1 != sha1:
        return f"its image file changed since extraction (sha1 {read.sha1[:10]}..., stored {sha1[:10]}...)", None
    return None, read.outputs[0]


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(
        prog="python -m featurepipe.verify",
        description="Re-extract random rows of a feature file (TF engine, the file's settings) and "
                    "compare with the stored features; exit 1 naming the rows that differ.")
    p.add_argument("file", metavar="FILE.h5", help="a feature file written by featurepipe.extract")
    p.add_argument("--sample", type=int, default=32, metavar="K", help="rows to check (0: all; default 32)")
    p.add_argument("--seed", type=int, default=0, help="picks the rows")
    p.add_argument("--data", help="the image folder, if it moved since extraction")
    p.add_argument("--weights", help="the weights file, if not found as for extraction")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest relative error per row (default {DEFAULT_TOLERANCE:g})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = verify(args.file, sample=args.sample, seed=args.seed, data=args.data,
                    weights=args.weights, tolerance=args.tolerance)
    for mismatch in result.mismatches:
        print(f"mismatch: {mismatch}", file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
