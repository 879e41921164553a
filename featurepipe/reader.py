"""Read images for every stage: bytes -> RGB arrays at the sizes the networks need (no TensorFlow).

One place holds the rules, so every stage gives the same verdict on the same file:

* only regular files are opened (a FIFO or a device named ``x.jpg`` is refused, never waited on),
  and every read is bounded (``MAX_FILE_BYTES``, and a timeout in ``read_images``);
* decoding applies the EXIF orientation, converts any mode to RGB, refuses more than
  ``max_pixels`` pixels and turns every failure into an ``ImageError`` whose message is the reason;
* JPEGs are decoded in the DCT domain at the smallest scale (1/2, 1/4, 1/8) that still leaves
  ``margin`` times the network's input size (``DECODE_MODES``); ``exact`` decodes every pixel.
  The mode is recorded in feature files, so verify and predict redo exactly the same;
* ``read_images`` decodes ahead in a bounded number of threads and yields in input order; one file
  read feeds several ``Target``s (several backbones), decoded once per distinct JPEG scale.
"""

import hashlib
import io
import math
import os
import queue
import stat
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import ImageError, UsageError

RESIZE_MODES = ("stretch", "crop", "pad")
DEFAULT_MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 1 << 30
READ_TIMEOUT = 120.0
TIMEOUT_REASON = "decoding took longer than"  # such skips are retried by the next run
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held

# Decode mode -> the smallest decoded side, as a multiple of the network's input size (0: exact).
# A recorded mode must always decode the same way: change a margin under a new name.
DECODE_MODES = {"scaled": 2.0, "exact": 0.0}
DEFAULT_DECODE = "scaled"
FILE_DECODE_DEFAULT = "exact"  # feature files written before the attribute existed


def check_decode(decode):
    if decode not in DECODE_MODES:
        raise UsageError(f"unknown --decode '{decode}'; use one of {', '.join(DECODE_MODES)}")
    return decode


@dataclass(frozen=True)
class Target:
    """One output per image: ``size`` x ``size`` RGB after ``resize``, from a ``decode``-mode decode.

    ``then`` (optional) runs in the reader's thread on the resized image, e.g. a network's forward
    pass, so one thread decodes while another runs the network; its errors propagate.
    """

    size: int
    resize: str = "stretch"
    decode: str = "exact"
    then: Optional[Callable] = None


@dataclass(frozen=True)
class Read:
    """A readable image: one array (or ``then``'s result) per target, and the file's sha1."""

    outputs: tuple
    sha1: str


# --------------------------------------------------------------------------- files


def file_stat(path):
    """(size in bytes, modification time in ns) of a file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def content_hash(data):
    """sha1 hex digest of a file's bytes (for duplicate detection and edit detection)."""
    return hashlib.sha1(data).hexdigest()


_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
          stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}


def read_bytes(path, *, limit=MAX_FILE_BYTES):
    """The bytes of a regular file; ImageError for anything else, a missing file or > ``limit``.

    The file is opened non-blocking and checked before reading, so a FIFO never blocks.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS.items() if test(st.st_mode)), "not a file")
            raise ImageError(f"not a regular file ({kind})")
        if st.st_size > limit:
            raise ImageError(f"file too large ({st.st_size} bytes > {limit})")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageError(f"file too large (> {limit} bytes)")
    return data


def file_sha1(path):
    """sha1 of a regular file's bytes, or None when it cannot be read (see ``read_bytes``)."""
    try:
        return content_hash(read_bytes(path))
    except ImageError:
        return None


# --------------------------------------------------------------------------- decode


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

    if rgb.shape[:2] == (size, size):
        _check_resize(resize)
        return rgb
    return resize_image(Image.fromarray(rgb), size, resize)


def _check_resize(resize):
    if resize not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode '{resize}'; use one of {', '.join(RESIZE_MODES)}")


def resize_image(img, size, resize="stretch"):
    """``resize_array`` for an RGB PIL image (no copy to an array before resizing)."""
    from PIL import Image

    _check_resize(resize)
    w, h = img.size
    if (h, w) == (size, size):
        return np.asarray(img)
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


def _draft_side(size, decode):
    """The smallest side a ``decode``-mode JPEG decode must keep for a ``size`` input (0: full)."""
    return math.ceil(size * DECODE_MODES[check_decode(decode)])


def _open(data, max_pixels, draft_side):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"too many pixels ({w}x{h} > {max_pixels}; possible decompression bomb)")
    if draft_side and img.format == "JPEG":
        img.draft(img.mode, (draft_side, draft_side))  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
    return img


def _finish(img):
    """The decoded, upright RGB PIL image."""
    from PIL import Image, ImageOps

    img.load()
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # scaled, not clipped
        img = Image.fromarray(_to_rgb_array(img))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.size) < 1:
        raise ImageError(f"unexpected decoded size {img.size}")
    return img


def _guarded(func, *args):
    """``func(*args)`` with every decoding failure turned into an ImageError naming the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func(*args)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unidentified format)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise ImageError(f"cannot decode: {err}") from None
    except Exception as err:  # a decoder bug on one file never ends a run
        raise ImageError(f"cannot decode: {type(err).__name__}: {err}") from None


def decode_bytes(data, *, max_pixels=DEFAULT_MAX_PIXELS, draft_side=0):
    """Decode image bytes to an RGB uint8 array (H, W, 3), applying EXIF orientation.

    ``draft_side`` > 0 lets a JPEG decode at a reduced scale that keeps both sides >= it.
    Raises ImageError with a short reason for empty, unreadable, truncated or oversized images.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    return _guarded(lambda: np.asarray(_finish(_open(data, max_pixels, draft_side))))


def decode_targets(data, targets, *, max_pixels=DEFAULT_MAX_PIXELS):
    """One resized RGB array per target from a file's bytes, decoding once per distinct JPEG scale.

    A target gets exactly what it would get alone: the scale depends on its own size and mode.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")

    def run():
        by_scale, out = {}, []
        for t in targets:
            img = _open(data, max_pixels, _draft_side(t.size, t.decode))
            if img.size not in by_scale:
                by_scale[img.size] = _finish(img)
            out.append(resize_image(by_scale[img.size], t.size, t.resize))
        return out

    return _guarded(run)


def read_image(path, targets, *, max_pixels=DEFAULT_MAX_PIXELS):
    """Read and decode one file for ``targets`` (without running ``then``); ImageError if it cannot."""
    data = read_bytes(path)
    return Read(tuple(decode_targets(data, targets, max_pixels=max_pixels)), content_hash(data))


def load_image(path, size, resize="stretch", *, decode="exact", max_pixels=DEFAULT_MAX_PIXELS):
    """Read, decode and resize one image file.

    Returns
    -------
    rgb : ndarray of shape (size, size, 3), uint8
    sha1 : str
        Content hash of the file's bytes.
    """
    read = read_image(path, [Target(size, resize, decode)], max_pixels=max_pixels)
    return read.outputs[0], read.sha1


# --------------------------------------------------------------------------- streaming


class _DaemonWorkers:
    """A few daemon threads running submitted calls.

    Unlike ``ThreadPoolExecutor`` (whose threads the interpreter joins at exit), a thread stuck in
    a pathological decoder never keeps the process alive once the run is over.
    """

    def __init__(self, n, name):
        self.tasks = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(n)]
        for thread in self.threads:
            thread.start()

    def submit(self, func, *args):
        future = Future()
        self.tasks.put((future, func, args))
        return future

    def _work(self):
        while True:
            task = self.tasks.get()
            if task is None:
                return
            future, func, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(func(*args))
            except BaseException as err:  # handed to the consumer
                future.set_exception(err)

    def shutdown(self, pending):
        for future in pending:
            future.cancel()
        for _ in self.threads:
            self.tasks.put(None)


def _read_then(path, targets, max_pixels, clock):
    """Read (or the ImageError saying why not), then each target's ``then``; ``clock`` receives
    ``started`` and ``decoded`` times, so the caller can time the reading alone."""
    clock["started"] = time.monotonic()
    try:
        read = read_image(path, targets, max_pixels=max_pixels)
    except ImageError as err:
        return err
    finally:
        clock["decoded"] = time.monotonic()
    return Read(tuple(out if t.then is None else t.then(out) for t, out in zip(targets, read.outputs)),
                read.sha1)


def _result_within(future, clock, timeout):
    """The future's result, or an ImageError once its reading (not ``then``) passed ``timeout``.

    A task that has not started when the time is up sits behind readers stuck on earlier files:
    it is reported too, so no file can hang the run.
    """
    while True:
        started = clock.get("started")
        if "decoded" in clock:
            return future.result()  # decoded: what is left is the network, never cut short
        left = timeout if started is None else timeout - (time.monotonic() - started)
        try:
            return future.result(timeout=max(left, 0.01))
        except FuturesTimeout:
            if "decoded" not in clock and (clock.get("started") is None
                                           or time.monotonic() - clock["started"] >= timeout):
                return ImageError(f"{TIMEOUT_REASON} {timeout:.0f} s")


def default_workers():
    return max(2, min(8, os.cpu_count() or 2))


def read_images(paths, targets, *, workers=None, prefetch=64, max_pixels=DEFAULT_MAX_PIXELS,
                timeout=READ_TIMEOUT):
    """Yield a ``Read`` or an ``ImageError`` per path, in input order, reading ahead in threads.

    Parameters
    ----------
    paths : iterable of str or Path
    targets : sequence of Target, or a callable path -> sequence of Target
        What to make of each image (a callable lets each path feed only some targets).
    workers : int, optional
        Reader threads (default: one per core, 2 to 8).
    prefetch : int
        Images read ahead at most (memory stays bounded however long ``paths`` is).
    timeout : float
        An image whose reading and decoding takes longer is reported as unreadable.
    """
    targets_of = targets if callable(targets) else (lambda _path, fixed=tuple(targets): fixed)
    pool = _DaemonWorkers(workers or default_workers(), "featurepipe-read")
    pending = deque()
    paths = iter(paths)

    def submit(path):
        clock = {}
        pending.append((pool.submit(_read_then, path, targets_of(path), max_pixels, clock), clock))

    try:
        for path in paths:
            submit(path)
            if len(pending) >= max(prefetch, 1):
                break
        while pending:
            result = _result_within(*pending.popleft(), timeout)
            nxt = next(paths, None)
            if nxt is not None:
                submit(nxt)
            yield result
    finally:
        pool.shutdown([future for future, _ in pending])
