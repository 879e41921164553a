"""Writing a feature file from its kept rows and new parts (beside ``store.py``, which owns the
layout): rows sorted by path, the skipped files, byte-identical duplicates counted, the settings
and provenance as attributes; written under a temporary name and renamed into place.
"""

import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


from . import __version__
from .engines import tensorflow_version
from .errors import DataError
from .store import FeatureFileWriter, load_part


MISSING = "file not found or not readable"  # listed (a CSV row, a broken link) but cannot be opened


@dataclass(frozen=True)
class ExtractResult:
    """What one backbone's run did."""

    path: Path
    n_rows: int
    n_extracted: int
    n_kept: int
    n_skipped: int
    n_new_skipped: int
    seconds: float
    duplicate_groups: int
    duplicate_leaks: int
    newly_skipped: tuple = ()
    n_resumed: int = 0  # rows of n_extracted computed by an earlier, interrupted run (its parts)
    files_in_pass: int = 1  # feature files made by the same pass over the images (same seconds)

    def summary(self, max_listed=10):
        computed = self.n_extracted - self.n_resumed
        rate = computed / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.n_resumed} from an interrupted run" if self.n_resumed else ""
        shared = f" for the {self.files_in_pass} files of one pass" if self.files_in_pass > 1 else ""
        line = (f"{self.path.name}: {self.n_rows} images ({computed} extracted{resumed}, "
                f"{self.n_kept} kept), {self.n_skipped} skipped, {self.seconds:.1f} s, "
                f"{rate:.1f} img/s{shared} -> {self.path}")
        for rel, reason in self.newly_skipped[:max_listed]:
            line += f"\n  skipped {rel}: {reason}"
        if len(self.newly_skipped) > max_listed:
            line += f"\n  ... and {len(self.newly_skipped) - max_listed} more (the file's 'skipped' dataset lists all)"
        if self.duplicate_groups:
            line += (f"\n  {self.duplicate_groups} groups of byte-identical images, "
                     f"{self.duplicate_leaks} across splits (see the file's sha1 dataset)")
        return line


def unchanged(index, plan, old):
    """True when the file would be written again with exactly the rows it holds."""
    if old is None or plan.refreshed or str(old.attrs.get("data_root", "")) != str(index.root):
        return False
    if sorted(plan.keep.values()) != list(range(len(old.paths))):
        return False
    if any(old.split[row] != plan.split[pos] for pos, row in plan.keep.items()):
        return False
    return skipped_rows(index, plan, {}) == sorted(
        (path, reason, int(size), int(mtime)) for (path, reason), (size, mtime) in zip(old.skipped, old.skipped_stat))


def untouched(path, old, started):
    n_skipped = len(old.skipped)
    return ExtractResult(path=path, n_rows=len(old.paths), n_extracted=0, n_kept=len(old.paths),
                         n_skipped=n_skipped, n_new_skipped=0, seconds=time.time() - started,
                         duplicate_groups=int(old.attrs.get("duplicate_groups", 0)),
                         duplicate_leaks=int(old.attrs.get("duplicate_leaks", 0)))


def assemble(index, plan, old, parts, new_skipped, path, spec, model, opts, started, n_resumed,
              engines_used):
    """Write the final file: kept rows from the old file and the new parts, sorted by path."""
    position = {p: i for i, p in enumerate(index.paths)}
    part_positions = [[position[str(p)] for p in load_part(part, keys=("paths",))["paths"]] for part in parts]
    good_positions = sorted(set(plan.keep) | {p for positions in part_positions for p in positions})
    listed = {**new_skipped, **{pos: MISSING for pos, st in enumerate(plan.stats) if st is None}}
    if not good_positions:
        first = sorted(listed.items())[:3]
        raise DataError(f"no readable images under '{index.root}' ({len(listed)} skipped, e.g. "
                        + "; ".join(f"{index.paths[pos]}: {reason}" for pos, reason in first)
                        + "); check the paths and files named there")
    dim = load_part(parts[0])["features"].shape[1] if parts else int(old.attrs["feature_dim"])
    row_of = {pos: r for r, pos in enumerate(good_positions)}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    writer = FeatureFileWriter(path, n_rows=len(good_positions), dim=dim,
                               class_names=index.class_names,
                               attrs=_attrs(index, spec, model, opts, dim, old, now, engines_used))
    try:
        _write_kept(writer, index, plan, old, row_of)
        for part in parts:
            _write_part(writer, index, plan, load_part(part), row_of, position)
        skipped = skipped_rows(index, plan, new_skipped)
        writer.write_skipped(skipped)
        dup_groups, dup_leaks = _duplicates(writer)
        writer.set_attrs(n_rows=len(good_positions), n_skipped=len(skipped),
                         duplicate_groups=dup_groups, duplicate_leaks=dup_leaks)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    n_new = sum(len(p) for p in part_positions)
    return ExtractResult(path=path, n_rows=len(good_positions), n_extracted=n_new,
                         n_kept=len(plan.keep), n_skipped=len(skipped),
                         n_new_skipped=len(new_skipped), seconds=time.time() - started,
                         duplicate_groups=dup_groups, duplicate_leaks=dup_leaks, n_resumed=n_resumed,
                         newly_skipped=tuple(sorted((index.paths[p], r) for p, r in listed.items())))


def _row_fields(index, plan, positions):
    return dict(labels=index.labels[positions], paths=[index.paths[p] for p in positions],
                split=[plan.split[p] for p in positions],
                file_size=[plan.stats[p][0] for p in positions],
                mtime_ns=[plan.stats[p][1] for p in positions])


def _write_kept(writer, index, plan, old, row_of):
    if not plan.keep:
        return
    from .store import iter_feature_blocks

    pos_of_old = {row: pos for pos, row in plan.keep.items()}
    for old_rows, feats in iter_feature_blocks(old.source, sorted(pos_of_old)):
        positions = [pos_of_old[int(r)] for r in old_rows]
        writer.write_rows([row_of[p] for p in positions], features=feats,
                          sha1=[old.sha1[r] for r in old_rows], **_row_fields(index, plan, positions))


def _write_part(writer, index, plan, part, row_of, position):
    positions = [position[str(p)] for p in part["paths"]]
    writer.write_rows([row_of[p] for p in positions], features=part["features"],
                      sha1=list(part["sha1"]), **_row_fields(index, plan, positions))


def skipped_rows(index, plan, new_skipped):
    rows = [(index.paths[pos], reason, size, mtime) for pos, (reason, size, mtime) in plan.keep_skipped.items()]
    rows += [(index.paths[pos], reason, *plan.stats[pos]) for pos, reason in new_skipped.items()]
    rows += [(rel, MISSING, -1, -1)
             for rel, st in zip(index.paths, plan.stats) if st is None]
    return sorted(rows)


def _duplicates(writer):
    """Count byte-identical images (groups) and those that span splits (leaks); warn about them."""
    f = writer.file
    sha1 = f["sha1"].asstr()[()]
    split = f["split"].asstr()[()]
    paths = f["paths"].asstr()[()]
    groups = {}
    for i, h in enumerate(sha1):
        groups.setdefault(h, []).append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    leaks = [g for g in dups if len({split[i] for i in g}) > 1]
    if dups:
        example = ", ".join(paths[i] for i in (leaks or dups)[0])
        warnings.warn(f"{len(dups)} groups of byte-identical images ({len(leaks)} across splits, "
                      f"which leaks test answers into training), e.g. {example}", stacklevel=2)
    return len(dups), len(leaks)


def _versions():
    """(TensorFlow, Keras) versions from package metadata: a LiteRT run need not import either."""
    from importlib import metadata

    try:
        keras_version = metadata.version("keras")
    except metadata.PackageNotFoundError:
        import keras

        keras_version = keras.__version__
    return tensorflow_version(), keras_version


def _engine_attr(model, old, engines_used):
    """The engine(s) that made the rows: this run's (``auto`` resolved) and the old file's."""
    names = set(engines_used) - {None}  # empty: no new rows
    if old is not None:
        names |= {n for n in str(old.attrs.get("engine", "")).split("+") if n and n != "auto"}
    return "+".join(sorted(names)) or _engine_without_building(model)


def _engine_without_building(model):
    """The engine an interrupted run made its parts with (``auto`` resolved as it resolved it)."""
    from .engines import auto_choice_without_building

    if model.engine_name != "auto":
        return model.engine_name
    return auto_choice_without_building(model.spec) or model.engine.name


def _attrs(index, spec, model, opts, dim, old, now, engines_used):
    tf_version, keras_version = _versions()
    attrs = spec.attrs()
    attrs.update(
        feature_dim=dim,
        engine=_engine_attr(model, old, engines_used),
        featurepipe_version=__version__,
        tensorflow_version=tf_version,
        keras_version=keras_version,
        data_root=str(index.root),
        seed=opts.seed,
        test_size=opts.test_size,
        val_size=opts.val_size,
        split_source="given" if index.given_split is not None else "assigned",
        created=(old.attrs.get("created") if old is not None else None) or now,
        updated=now,
    )
    return attrs
