"""Which rows and images a fine-tuning run uses, its settings and its work folder."""

import json
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import check_seed
from ..errors import DataError, ImageError, UsageError
from ..images import assign_split
from ..paths import models_dir_for
from ..reader import read_images
from ..settings import ExtractionSettings


@dataclass(frozen=True)
class Settings:
    """The settings that determine a run's numbers (a checkpoint is only resumed when they match)."""

    unfreeze: object
    lr: float
    head_lr: float
    head_epochs: int
    batch_size: int
    dropout: float
    val_size: float
    augment: bool
    seed: int


def output_paths(feature_file, models_dir=None):
    """(``.keras`` path, ``.json`` path, work folder) for a feature file's fine-tuned model."""
    feature_file = Path(feature_file)
    folder = models_dir_for(feature_file, root=models_dir)
    name = f"{feature_file.stem}__finetune"
    return folder / f"{name}.keras", folder / f"{name}.json", folder / f".{name}.work"


def check_settings(unfreeze, epochs, head_epochs, lr, head_lr, batch_size, dropout, patience, val_size,
           augment, seed):
    if isinstance(unfreeze, str) and unfreeze.strip().isdigit():
        unfreeze = int(unfreeze)
    if isinstance(unfreeze, int) and unfreeze < 0:
        raise UsageError(f"--unfreeze must be a layer count >= 0, a layer name or 'all'; got {unfreeze}")
    for name, value, low in (("epochs", epochs, 0), ("head-epochs", head_epochs, 0),
                             ("patience", patience, 1)):
        if int(value) != value or value < low:
            raise UsageError(f"--{name} must be an integer >= {low}; got {value}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {batch_size}")
    for name, value in (("lr", lr), ("head-lr", head_lr)):
        if not value > 0:
            raise UsageError(f"--{name} must be > 0; got {value}")
    if not 0 <= dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1); got {dropout}")
    if not 0 < val_size < 1:
        raise UsageError(f"--val-size must be in (0, 1); got {val_size}")
    check_seed(seed)
    return Settings(unfreeze=unfreeze, lr=float(lr), head_lr=float(head_lr),
                     head_epochs=int(head_epochs), batch_size=int(batch_size),
                     dropout=float(dropout), val_size=float(val_size), augment=bool(augment),
                     seed=int(seed))


def feature_file_for(data, backbone, features, extract_missing, preprocess, quiet):
    """The feature file to use; extracted first when missing and ``extract_missing``."""
    if features is not None:
        path = Path(features)
        if not path.is_file():
            raise UsageError(f"feature file not found: '{path}'")
        return path
    if data is None:
        raise UsageError("pass --data DIR (the image folder) or --features FILE.h5")
    from ..extract import default_out_dir, extract, output_path

    path = output_path(default_out_dir(data), backbone, "none")
    if path.is_file():
        return path
    if not extract_missing:
        pre = f" --preprocess {preprocess}" if preprocess else ""
        raise UsageError(f"no features of '{backbone}' for '{data}' ({path} is missing); run "
                         f"python -m featurepipe.extract --data {data} --backbone {backbone}{pre} "
                         "first, or pass --extract")
    extract(data, [backbone], out=path.parent, preprocess=preprocess, quiet=quiet)
    return path


def split_rows(feats, settings):
    """Row indices of the feature file per split: {"train", "val", "test"} -> int64 arrays."""
    split = np.asarray(feats.split)
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"'{feats.source}' has {len(train)} train and {len(test)} test rows; "
                        "fine-tuning needs both (extract with --test-size > 0)")
    if len(val) == 0:
        picked = assign_split([feats.paths[i] for i in train], feats.y[train],
                              test_size=settings.val_size, val_size=0.0, seed=settings.seed)
        is_val = np.array([s == "test" for s in picked])
        train, val = train[~is_val], train[is_val]
    if len(val) == 0:
        raise DataError(f"'{feats.source}' has too few train rows to take val rows from")
    return {"train": train, "val": val, "test": test}


def decoded_images(feats, rows, spec, work, quiet):
    """Every used row's image, decoded and resized once, cached in ``work/images.npy``.

    Returns
    -------
    images : ndarray of shape (n_rows_in_file, S, S, 3), uint8 (a memory map)
    rows : dict of int64 arrays, without rows whose image no longer decodes
    """
    size, n = int(spec.image_size), len(feats.paths)
    cache, marker = work / "images.npy", work / "images.json"
    bad = _cached_bad_rows(cache, marker, n, size)
    if bad is None:
        images = np.lib.format.open_memmap(cache, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        wanted = np.sort(np.concatenate(list(rows.values())))
        root = Path(str(feats.attrs["data_root"]))
        stream = read_images([str(root / feats.paths[i]) for i in wanted], [ExtractionSettings.from_attrs(feats.attrs).target()])
        bad = {}
        for i, item in zip(wanted, progress(stream, len(wanted), "decode", quiet)):
            if isinstance(item, ImageError):
                bad[int(i)] = str(item)
            else:
                images[i] = item.outputs[0]
        images.flush()
        del images
        marker.write_text(json.dumps({"n": n, "size": size, "bad": bad}))
    if bad:
        example = next(iter(bad.items()))
        warnings.warn(f"{len(bad)} images no longer decode and are left out, e.g. "
                      f"{feats.paths[example[0]]}: {example[1]}", stacklevel=3)
        drop = np.array(sorted(bad), dtype=np.int64)
        rows = {k: np.setdiff1d(v, drop) for k, v in rows.items()}
    return np.load(cache, mmap_mode="r"), rows


def _cached_bad_rows(cache, marker, n, size):
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("n") != n or info.get("size") != size or not cache.is_file():
        return None
    return {int(k): v for k, v in info["bad"].items()}


def progress(iterable, total, desc, quiet):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=quiet, leave=False,
                file=sys.stderr)


def prepare_work(work, feature_file, feats, settings, restart, quiet):
    """The checkpoint folder, emptied when it belongs to other settings or ``restart``."""
    identity = {"feature_file": str(Path(feature_file).resolve()),
                "feature_file_updated": str(feats.attrs.get("updated", "")),
                "n_rows": len(feats.paths), **{k: jsonable(v) for k, v in settings.__dict__.items()}}
    marker = work / "settings.json"
    if work.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if restart or not same:
            if not quiet and not restart:
                print(f"note: checkpoints in {work} are from other settings; starting again",
                      file=sys.stderr)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        from ..store import write_json_atomic

        write_json_atomic(marker, identity)
    return work


def jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value
