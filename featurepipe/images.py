"""Find labelled images on disk: the one folder walker of every stage (decoding: ``reader``).

Three layouts are understood:

* ``ROOT/<class>/...``                  one folder per class (nested folders are searched too);
* ``ROOT/{train,val,test}/<class>/...`` the split is then taken as given;
* a CSV manifest ``path,label[,split]``  paths relative to the CSV's folder (rows leaving that
  folder are refused unless ``allow_outside``).

Walking rules (``walk_images``): hidden names are ignored; symlinked folders are followed but each
real folder is visited once (a loop ends); folders passed as ``exclude`` (the output folder) are
never entered, nor is any folder that resolves into featurepipe's own output folders
(``featurepipe.paths.own_output_folders``: models, features, featurepipe-out, cache) unless the
data itself lies there; every non-folder entry with an image extension is listed, so that a FIFO, a device
or a broken symlink reaches the reader, which refuses it with a reason recorded like any
unreadable image (only regular files are ever opened).

Classes are sorted by name; paths are stored relative to the data root with ``/`` separators.
"""

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .paths import own_output_folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class ImageIndex:
    """The labelled images found under one data root.

    Attributes
    ----------
    root : Path
        The data root; ``paths`` are relative to it.
    paths : list of str, length n_images
        Relative paths with ``/`` separators, sorted.
    labels : ndarray of shape (n_images,), int32
        Index into ``class_names``.
    class_names : list of str
        Sorted class names.
    given_split : list of str or None
        ``train``/``val``/``test`` per image when the layout or manifest defines it.
    """

    root: Path
    paths: list
    labels: np.ndarray
    class_names: list
    given_split: list = None
    empty_classes: list = field(default_factory=list)

    def __len__(self):
        return len(self.paths)

    def absolute(self, rel_path):
        """The absolute path of a stored relative path (stored paths are already normalised; joining
        strings is ~10x cheaper than pathlib, and it runs twice per image)."""
        return os.path.join(self.root, rel_path)

    def images_folder(self):
        """The deepest folder holding every listed image (the root for a folder layout; for a CSV
        manifest, the common folder of the files it lists). No output may be written inside it."""
        if not self.paths:
            return Path(self.root)
        folders = {os.path.dirname(self.absolute(p)) for p in self.paths}
        return Path(os.path.commonpath(sorted(folders)))

    def images_folders(self):
        """The folders no output may be written inside: those holding the listed images (none
        below another). Computed from the rows, so one absolute row of a CSV manifest
        (``--allow-outside``) does not make its common folder, e.g. ``/``, an input folder."""
        folders = sorted({os.path.dirname(self.absolute(p)) for p in self.paths} or {str(self.root)})
        kept = set()
        for folder in folders:  # sorted: a folder comes after its ancestors
            if not any(str(parent) in kept for parent in Path(folder).parents):
                kept.add(folder)
        return [Path(f) for f in sorted(kept)]


def is_image_file(name):
    """True for a visible file whose extension (any case) is an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_key(path):
    """What identifies a real folder, whatever symlinks lead to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def own_folders_around(top):
    """Real paths of featurepipe's output folders (``own_output_folders``), except one holding ``top``."""
    top = os.path.realpath(top)
    own = [os.path.realpath(p) for p in own_output_folders()]
    return [o for o in own if not _contains(o, top)]


def _into_own(path, own):
    """The own output folder ``path`` resolves into, or None."""
    real = os.path.realpath(path)
    return next((o for o in own if _contains(o, real)), None)


def _warn_own(path, folder):
    warnings.warn(f"'{path}' leads into featurepipe's own output folder '{folder}'; not listed", stacklevel=4)


def _exclude_keys(exclude):
    keys = set()
    for folder in exclude:
        try:
            keys.add(_folder_key(folder))
        except OSError:
            pass  # not made yet: holds nothing to skip
    return keys


def walk_images(folder, *, exclude=(), seen=None):
    """Sorted image entries below ``folder`` (see the module's walking rules).

    Parameters
    ----------
    folder : str or Path
    exclude : iterable of str or Path
        Folders never entered (e.g. the output folder when it lies inside the data).
    seen : set, optional
        Keys (``_folder_key``) of folders already visited, shared by the walks of one listing
        and updated; ``folder`` itself is walked even when in it.

    Returns
    -------
    list of Path
    """
    seen = set() if seen is None else seen
    seen |= _exclude_keys(exclude)
    found = []
    top_real = os.path.realpath(folder)
    own = own_folders_around(folder)

    def visit(path, top=False):
        try:
            key = _folder_key(path)
            if key in seen and not top:
                return
            seen.add(key)
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:
            warnings.warn(f"cannot read folder '{path}' ({err.strerror or err}): its images are "
                          "left out", stacklevel=4)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                if entry.is_symlink() and _contains(os.path.realpath(entry.path), top_real):
                    # a link to a folder above this one would pull in everything around the data set
                    warnings.warn(f"'{entry.path}' links to a folder that contains '{folder}'; "
                                  "not followed", stacklevel=4)
                    continue
                if (into := _into_own(entry.path, own)) is not None:
                    _warn_own(entry.path, into)
                    continue
                visit(entry.path)
            elif is_image_file(entry.name):
                found.append(Path(entry.path))

    visit(folder, top=True)
    return sorted(found)


def _contains(outer, inner):
    """Whether real path ``inner`` is ``outer`` or lies below it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _is_dir(entry):
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _warn_loose_images(folder):
    """Images lying next to class folders belong to no class: say so instead of dropping them silently."""
    loose = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and is_image_file(p.name))
    if loose:
        warnings.warn(f"{len(loose)} images lie directly in '{folder}', outside any class folder, "
                      f"and are left out (e.g. {loose[0]}); move them into a class folder", stacklevel=3)


def expand_paths(items, *, exclude=()):
    """Image files from files and folders, in the order given (folders walked by ``walk_images``).

    A file named directly is kept whatever it is: the reader gives the verdict on it.
    """
    out = []
    for item in items:
        path = Path(item)
        out += walk_images(path, exclude=exclude) if path.is_dir() else [path]
    return out


def _subfolders(folder, exclude_keys=frozenset(), own=None):
    own = own_folders_around(folder) if own is None else own
    found = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_symlink() and not p.exists() and not p.name.startswith(".") and not is_image_file(p.name):
            warnings.warn(f"'{p}' is a symbolic link to nothing ({os.readlink(p)}); left out", stacklevel=3)
            continue
        if p.name.startswith(".") or not p.is_dir():
            continue
        if (into := _into_own(p, own)) is not None:
            _warn_own(p, into)
            continue
        if _folder_key(p) not in exclude_keys:
            found.append(p)
    return found


def _has_split_level(root, exclude_keys):
    names = [p.name.lower() for p in _subfolders(root, exclude_keys)]
    return bool(names) and all(n in SPLIT_ALIASES for n in names) and any(
        _subfolders(p, exclude_keys) for p in _subfolders(root, exclude_keys))


def list_images(data, *, exclude=(), allow_outside=False):
    """Index the labelled images of a folder or a CSV manifest.

    Parameters
    ----------
    data : str or Path
        A folder of class folders, a folder of ``train/val/test`` folders of class folders, or a
        ``.csv`` manifest with columns ``path,label[,split]``.
    exclude : iterable of str or Path
        Folders never listed (the output folder).
    allow_outside : bool
        Accept CSV rows naming files outside the manifest's folder (stored as absolute paths).

    Returns
    -------
    ImageIndex
    """
    data = check_data(data)
    if data.is_file():
        return _index_from_csv(data, allow_outside)
    return _index_from_folders(data, list(exclude))


def check_data(data):
    """``data`` as a Path when it is a folder or a ``.csv`` file; UsageError naming the fix otherwise."""
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data not found: '{data}'; pass --data a folder of class folders or a CSV")
    if data.is_file() and data.suffix.lower() != ".csv":
        raise UsageError(f"--data '{data}' is a file but not a .csv manifest (path,label[,split])")
    return data


def _index_from_folders(root, exclude):
    root = root.resolve()
    exclude_keys = _exclude_keys(exclude)
    entries = []  # (path, class_name, split or None)
    class_folders = {}
    given = _has_split_level(root, exclude_keys)
    split_dirs = _subfolders(root, exclude_keys) if given else [root]
    for folder in ([root] if given else []) + split_dirs:
        _warn_loose_images(folder)
    layout = [(d, c) for d in split_dirs for c in _subfolders(d, exclude_keys)]
    # One walk: a symlink from a class folder to the root or to another class is not followed.
    seen = exclude_keys | {_folder_key(root)} | {_folder_key(d) for d in split_dirs}
    seen |= {_folder_key(c) for _, c in layout}
    for split_dir, class_dir in layout:
        split = SPLIT_ALIASES[split_dir.name.lower()] if given else None
        class_folders.setdefault(class_dir.name, []).append(class_dir)
        entries += [(f, class_dir.name, split) for f in walk_images(class_dir, seen=seen)]
    if not class_folders:
        raise DataError(f"no class folders in '{root}'; expected ROOT/<class>/<image> "
                        "or ROOT/train/<class>/<image>, or pass a CSV manifest")
    rel = [(f.relative_to(root).as_posix(), c, s) for f, c, s in entries]
    return _make_index(root, rel, sorted(class_folders), given)


def _manifest_path(root, path, where, allow_outside):
    """The stored path of a manifest row: relative to ``root``, or absolute when allowed outside."""
    full = Path(os.path.normpath(path if os.path.isabs(path) else root / path))
    real = os.path.realpath(full)  # a symlink inside the folder may point outside it
    try:
        rel = full.relative_to(root).as_posix()
        if not allow_outside and not _contains(str(root), real):
            raise ValueError(real)
        return rel
    except ValueError:
        if not allow_outside:
            raise DataError(f"{where}: '{path}' is outside the manifest's folder '{root}'; move the "
                            "image there or pass --allow-outside to read it anyway") from None
        return full.as_posix()


def _index_from_csv(csv_path, allow_outside):
    try:
        return _read_manifest(csv_path, allow_outside)
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path} is not UTF-8 text (byte {err.start}: {err.reason}); save the "
                        "manifest as UTF-8 CSV (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as err:
        raise DataError(f"{csv_path} is not a readable CSV ({err}); expected lines 'path,label[,split]'") from None


def _read_manifest(csv_path, allow_outside):
    root = csv_path.resolve().parent
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected 'path,label[,split]', got {row!r}")
            path, label = row[0].strip(), row[1].strip()
            split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else None
            if split is not None and split not in SPLIT_ALIASES:
                raise DataError(f"{csv_path}:{lineno}: split must be train, val or test, got '{split}'")
            rel_path = _manifest_path(root, path, f"{csv_path}:{lineno}", allow_outside)
            rows.append((rel_path, label, SPLIT_ALIASES.get(split)))
    splits = {s for _, _, s in rows}
    if None in splits and len(splits) > 1:
        raise DataError(f"{csv_path}: give a split for every row or for none")
    return _make_index(root, rows, sorted({c for _, c, _ in rows}), splits != {None})


def _make_index(root, rows, class_names, split_given):
    rows = sorted(rows)
    seen, unique = set(), []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            unique.append(row)
    counts = {c: 0 for c in class_names}
    for _, c, _ in unique:
        counts[c] += 1
    empty = [c for c, n in counts.items() if n == 0]
    for name in empty:
        warnings.warn(f"class folder '{name}' has no images", stacklevel=3)
    if not unique:
        raise DataError(f"no images found under '{root}' (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    class_of = {c: i for i, c in enumerate(class_names)}
    return ImageIndex(
        root=Path(root),
        paths=[p for p, _, _ in unique],
        labels=np.array([class_of[c] for _, c, _ in unique], dtype=np.int32),
        class_names=list(class_names),
        given_split=[s for _, _, s in unique] if split_given else None,
        empty_classes=empty,
    )


# --------------------------------------------------------------------------- split


def check_class_sizes(index, *, test_size, val_size, min_train=2, warn=False):
    """Refuse (DataError; with ``warn``, a warning), before any feature is extracted, a split
    that leaves a class fewer than ``min_train`` training (train + val) images: compare's
    cross-validation needs two per class. ``run`` refuses; ``extract`` warns (its features may
    serve other ends).

    The counts are those ``assign_split`` gives a fresh run (or the layout's own split). The
    message names the class, its counts and the option to change.
    """
    try:
        _check_class_sizes(index, test_size=test_size, val_size=val_size, min_train=min_train)
    except DataError as err:
        if not warn:
            raise
        warnings.warn(f"{err} (compare will refuse these features)", stacklevel=2)


def _check_class_sizes(index, *, test_size, val_size, min_train):
    if not 0 <= test_size < 1 or not 0 <= val_size < 1 or test_size + val_size >= 1:
        raise UsageError(f"--test-size and --val-size must be in [0, 1) with a sum below 1 "
                         f"(got {test_size} and {val_size})")
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    if index.given_split is not None:
        train = np.bincount(index.labels[np.isin(index.given_split, ("train", "val"))],
                            minlength=len(index.class_names))
    else:
        train = np.array([n - _n_test(n, test_size) for n in counts])
    short = [k for k in np.flatnonzero(train < min_train) if counts[k] > 0]
    if not short:
        return
    k = int(short[0])
    name, n, kept = index.class_names[k], int(counts[k]), int(train[k])
    more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
    if n < min_train:
        raise DataError(f"class '{name}' has {n} image{more}; cross-validation needs {min_train} training "
                        f"images per class: add images to '{name}' or remove the class")
    if index.given_split is not None:
        why, fix = "in the layout's train/val folders", f"move test images of '{name}' to train"
    elif n < min_train + 1:
        why = f"for training (one goes to the test split, --test-size {test_size:g})"
        fix = f"add images to '{name}' ({min_train + 1} per class at least) or remove the class"
    else:
        why, fix = f"for training with --test-size {test_size:g}", "lower --test-size (default 0.2)"
    raise DataError(f"class '{name}' keeps {kept} of its {n} images {why}{more}; cross-validation needs "
                    f"{min_train} training images per class: {fix}")


def _n_test(n, test_size):
    """How many of a class's ``n`` images ``assign_split`` puts in test on a fresh run."""
    n_test = int(round(n * test_size))
    if n > 1 and test_size > 0:
        n_test = max(n_test, 1)
    return min(n_test, max(n - 1, 0))


def split_hash(seed, rel_path):
    """A number in [0, 1) from the seed and the relative path (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(paths, labels, *, test_size, val_size, seed, known=None):
    """Give each image ``train``, ``val`` or ``test``.

    Images in ``known`` (a dict path -> split) keep theirs. When nothing is known yet, the rest are
    split stratified by class: within each class, images ordered by ``split_hash`` and the first
    ``round(n * test_size)`` go to test, the next ``round(n * val_size)`` to val. When some images
    already have a split (an incremental run), each new image gets its split from its own hash, as
    TF's retrain script does, so a re-run never moves an old image.

    Returns
    -------
    list of str, length n_images
    """
    known = known or {}
    labels = np.asarray(labels)
    result = [known.get(p) for p in paths]
    todo = [i for i, s in enumerate(result) if s is None]
    hashes = {i: split_hash(seed, paths[i]) for i in todo}
    if known:
        for i in todo:
            u = hashes[i]
            result[i] = "test" if u < test_size else "val" if u < test_size + val_size else "train"
        return result
    for label in np.unique(labels[todo]) if todo else []:
        members = sorted((i for i in todo if labels[i] == label), key=lambda i: (hashes[i], paths[i]))
        n = len(members)
        n_test = _n_test(n, test_size)
        n_val = int(round(n * val_size))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        for rank, i in enumerate(members):
            result[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return result
