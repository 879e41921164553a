"""Find labelled images on disk and decode them to RGB arrays (no TensorFlow here).

Three layouts are understood:

* ``ROOT/<class>/...``                  one folder per class (nested folders are searched too);
* ``ROOT/{train,val,test}/<class>/...`` the split is then taken as given;
* a CSV manifest ``path,label[,split]``  paths relative to the CSV's folder (or absolute).

Classes are sorted by name; paths are stored relative to the data root with ``/`` separators.
"""

import csv
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, ImageError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
RESIZE_MODES = ("stretch", "crop", "pad")
DEFAULT_MAX_PIXELS = 100_000_000
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held


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
        """The absolute path of a stored relative path."""
        return str(self.root / rel_path)


def is_image_file(name):
    """True for a visible file whose extension (any case) is an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder):
    """Sorted image files below ``folder`` (recursive, hidden files and folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_warn_unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # Regular files (and symlinks, a broken one is then recorded as skipped): a FIFO or
        # device named .jpg would block the reader forever.
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f) and (
            os.path.isfile(os.path.join(dirpath, f)) or os.path.islink(os.path.join(dirpath, f))))
    return sorted(found)


def _warn_unreadable(err):
    warnings.warn(f"cannot read folder '{err.filename}' ({err.strerror}): its images are left out",
                  stacklevel=2)


def _warn_loose_images(folder):
    """Images lying next to class folders belong to no class: say so instead of dropping them silently."""
    loose = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and is_image_file(p.name))
    if loose:
        warnings.warn(f"{len(loose)} images lie directly in '{folder}', outside any class folder, "
                      f"and are left out (e.g. {loose[0]}); move them into a class folder", stacklevel=3)


def _subfolders(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_split_level(root):
    names = [p.name.lower() for p in _subfolders(root)]
    return bool(names) and all(n in SPLIT_ALIASES for n in names) and any(
        _subfolders(p) for p in _subfolders(root))


def list_images(data):
    """Index the labelled images of a folder or a CSV manifest.

    Parameters
    ----------
    data : str or Path
        A folder of class folders, a folder of ``train/val/test`` folders of class folders, or a
        ``.csv`` manifest with columns ``path,label[,split]``.

    Returns
    -------
    ImageIndex
    """
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data not found: '{data}'; pass --data a folder of class folders or a CSV")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise UsageError(f"--data '{data}' is a file but not a .csv manifest (path,label[,split])")
        return _index_from_csv(data)
    return _index_from_folders(data)


def _index_from_folders(root):
    root = root.resolve()
    entries = []  # (rel_path, class_name, split or None)
    class_folders = {}
    _warn_loose_images(root)
    if _has_split_level(root):
        for split_dir in _subfolders(root):
            _warn_loose_images(split_dir)
            split = SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in _subfolders(split_dir):
                class_folders.setdefault(class_dir.name, []).append(class_dir)
                entries += [(f, class_dir.name, split) for f in _walk_images(class_dir)]
        given = True
    else:
        for class_dir in _subfolders(root):
            class_folders.setdefault(class_dir.name, []).append(class_dir)
            entries += [(f, class_dir.name, None) for f in _walk_images(class_dir)]
        given = False
    if not class_folders:
        raise DataError(f"no class folders in '{root}'; expected ROOT/<class>/<image> "
                        "or ROOT/train/<class>/<image>, or pass a CSV manifest")
    rel = [(f.relative_to(root).as_posix(), c, s) for f, c, s in entries]
    return _make_index(root, rel, sorted(class_folders), given)


def _index_from_csv(csv_path):
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
            full = Path(path) if os.path.isabs(path) else root / path
            try:
                rel_path = full.resolve().relative_to(root).as_posix()
            except ValueError:
                rel_path = full.resolve().as_posix()
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
        n_test = int(round(n * test_size))
        n_val = int(round(n * val_size))
        if n > 1 and test_size > 0:
            n_test = max(n_test, 1)
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        for rank, i in enumerate(members):
            result[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return result


# --------------------------------------------------------------------------- decode


def file_stat(path):
    """(size in bytes, modification time in ns) of a file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def content_hash(data):
    """sha1 hex digest of a file's bytes (for duplicate detection and edit detection)."""
    return hashlib.sha1(data).hexdigest()


def _to_rgb_array(img):
    """An RGB uint8 array from any PIL mode, scaling 16-bit and float data instead of clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def resize_array(rgb, size, resize="stretch"):
    """Resize an RGB uint8 array (H, W, 3) to (size, size, 3) with bilinear filtering.

    ``stretch`` resizes the whole image (no crop); ``crop`` resizes the short side to ``size`` and
    centre-crops; ``pad`` resizes the long side to ``size`` and pads with black.
    """
    from PIL import Image

    if resize not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode '{resize}'; use one of {', '.join(RESIZE_MODES)}")
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    img = Image.fromarray(rgb)
    if resize == "stretch":
        return np.asarray(img.resize((size, size), Image.BILINEAR))
    scale = size / min(h, w) if resize == "crop" else size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(img.resize((new_w, new_h), Image.BILINEAR))
    if resize == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return resized[top:top + size, left:left + size]
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def decode_bytes(data, *, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode image bytes to an RGB uint8 array (H, W, 3), applying EXIF orientation.

    Raises ImageError with a short reason for empty, unreadable, truncated or oversized images.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels ({w}x{h} > {max_pixels}; possible decompression bomb)")
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
                img = ImageOps.exif_transpose(img)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            rgb = _to_rgb_array(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unidentified format)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise ImageError(f"cannot decode: {err}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"unexpected decoded shape {rgb.shape}")
    return rgb


def load_image(path, size, resize="stretch", *, max_pixels=DEFAULT_MAX_PIXELS):
    """Read, decode and resize one image file.

    Returns
    -------
    rgb : ndarray of shape (size, size, 3), uint8
    sha1 : str
        Content hash of the file's bytes.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    return resize_array(decode_bytes(data, max_pixels=max_pixels), size, resize), content_hash(data)
