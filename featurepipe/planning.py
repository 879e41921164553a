"""Planning one feature file's extraction: which images it still needs, its split, its lock,
and the part files that hold finished chunks (``OUT/.<name>.parts/``).

A file is extended only when it was made with the same settings (``existing_file``); an image is
kept when its size and modification time (or its content hash) are unchanged; a part is used only
for exactly the images it was made from (``valid_part``), so a run killed at any moment and
started again, even after images were added or removed, ends with the same file as a clean run.
"""

import fcntl
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path


from .backbones import feature_file_stem
from .errors import DataError, UsageError
from .images import assign_split
from .reader import TIMEOUT_REASON, file_sha1, file_stat
from .settings import OLD_DEFAULTS
from .store import load, load_part, remove_stale_temps, write_json_atomic


class OutputLock:
    """An exclusive, non-blocking lock on an output file (released by the OS if the process dies)."""

    def __init__(self, path):
        self.path = path
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise UsageError(f"another featurepipe run is writing '{self.path.name[1:-5]}' "
                             "(wait for it to finish)") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


@dataclass
class FilePlan:
    stats: list          # (size, mtime_ns) or None per index entry
    keep: dict           # index position -> old row
    keep_skipped: dict   # index position -> (reason, size, mtime)
    refreshed: dict      # index position -> (size, mtime) for kept rows whose stat changed
    pending: list        # index positions to extract
    split: list          # split per index entry


def plan_file(index, old, out_dir, path, opts):
    stats = []
    for rel in index.paths:
        try:
            stats.append(file_stat(index.absolute(rel)))
        except OSError:
            stats.append(None)
    keep, keep_skipped, refreshed, pending = {}, {}, {}, []
    old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    old_skips = {}
    if old is not None:
        for (p, reason), (size, mtime) in zip(old.skipped, old.skipped_stat):
            old_skips[p] = (reason, int(size), int(mtime))
    for pos, rel in enumerate(index.paths):
        stat = stats[pos]
        if stat is None:  # listed (e.g. in a CSV) but missing: recorded as skipped
            continue
        row = old_rows.get(rel)
        if stat is not None and row is not None:
            if (int(old.file_size[row]), int(old.mtime_ns[row])) == stat:
                keep[pos] = row
                continue
            if _same_content(index.absolute(rel), old.sha1[row]):
                keep[pos], refreshed[pos] = row, stat
                continue
        if (stat is not None and rel in old_skips and old_skips[rel][1:] == stat
                and not old_skips[rel][0].startswith(TIMEOUT_REASON)):  # a timeout may not recur: retried
            keep_skipped[pos] = old_skips[rel]
            continue
        pending.append(pos)
    split = _splits(index, old, keep, out_dir, path, opts)
    return FilePlan(stats, keep, keep_skipped, refreshed, pending, split)


def _same_content(abs_path, old_sha1):
    return file_sha1(abs_path) == old_sha1


def _splits(index, old, keep, out_dir, path, opts):
    """Splits: given by the layout, else kept from this file or its siblings, else assigned."""
    if index.given_split is not None:
        return list(index.given_split)
    known = {}
    for sibling in sorted(Path(out_dir).glob("*.h5")):
        if sibling == path:
            continue
        try:
            other = load(sibling, features=False)
        except Exception:
            continue
        if other.attrs.get("seed") == opts.seed and other.attrs.get("split_source") == "assigned":
            known.update(zip(other.paths, other.split))
    if old is not None:
        known.update({index.paths[pos]: old.split[row] for pos, row in keep.items()})
    known = {p: s for p, s in known.items()}
    return assign_split(index.paths, index.labels, test_size=opts.test_size,
                        val_size=opts.val_size, seed=opts.seed, known=known)


def existing_file(path, identity, overwrite):
    """The old file's rows (without features) when it can be extended, else None."""
    if not path.exists() or overwrite:
        return None
    try:
        old = load(path, features=False)
    except DataError as err:
        raise UsageError(f"{err}; pass --overwrite to replace it") from None
    made = {**OLD_DEFAULTS, **old.attrs}
    changed = [f"{k}={made.get(k)!r} (now {v!r})" for k, v in identity.items()
               if str(made.get(k, "")) != str(v)]
    if changed:
        raise UsageError(f"'{path}' was made with other settings: {', '.join(changed)}; pass the "
                         "same options, --overwrite to replace it or --out to write elsewhere")
    return old


def part_name(k, members, index, stats):
    """Chunk ``k``'s part file, named by a digest of the images it holds."""
    digest = hashlib.sha1("\n".join(f"{index.paths[p]}|{stats[p]}" for p in members).encode()).hexdigest()[:16]
    return f"part-{k:06d}-{digest}.npz"


def valid_part(part_path, index, members, keys):
    """A part's ``keys`` when it holds exactly the images of ``members`` (by path), else None.

    Parts store paths, not index positions: a part made before the folder changed (an image
    added or removed shifts every position) is used for the same images or not at all.
    """
    part = load_part(part_path, keys=tuple(dict.fromkeys(("paths", "bad_paths") + tuple(keys))))
    if part is None:
        return None
    held = [str(p) for p in part["paths"]] + [str(p) for p in part["bad_paths"]]
    if sorted(held) != sorted(index.paths[p] for p in members):
        return None
    return part


def prepare_parts_dir(parts_dir, identity):
    marker = parts_dir / "settings.json"
    if parts_dir.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json_atomic(marker, identity)


def remove_leftovers(path, parts_dir):
    """Temporary files of writers killed before they could rename them (we hold the lock)."""
    removed = remove_stale_temps(path.parent, f".{path.name}")
    if parts_dir.is_dir():
        removed += remove_stale_temps(parts_dir)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary files left by a killed run, e.g. "
                      f"{removed[0]}", stacklevel=4)


def output_path(out_dir, backbone_name, augment, layer=None):
    """``OUT/<backbone>.h5`` for the default layer, ``OUT/<backbone>@<layer>.h5`` for another."""
    return Path(out_dir) / f"{feature_file_stem(backbone_name, layer=layer, augment=augment)}.h5"
