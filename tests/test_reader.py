"""The one reader and walker below every stage: bounded reads, loops, outputs, manifests, scales."""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COLORS, make_dataset, make_image
from featurepipe import reader
from featurepipe.errors import DataError, ImageError
from featurepipe.images import expand_paths, list_images, walk_images
from featurepipe.reader import Target, decode_bytes, decode_targets, read_bytes, read_images

ROOT = Path(__file__).resolve().parents[1]


def bounded(func, seconds=30):
    """func() in a daemon thread; fails (instead of hanging the suite) when it does not return."""
    out = {}

    def run():
        try:
            out["value"] = func()
        except BaseException as err:  # handed back to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{func} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _photo(path, size=(1600, 1200), quality=90):
    """A smooth JPEG photo-like image (gradients and a disc)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2) * 200],
                   axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=quality)
    return path


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "link.jpg")
    for path in (fifo, tmp_path / "link.jpg"):
        with pytest.raises(ImageError, match=r"not a regular file \(a FIFO\)"):
            bounded(lambda: read_bytes(path))
    [item] = bounded(lambda: list(read_images([fifo], [Target(8)])))
    assert isinstance(item, ImageError) and str(item) == "not a regular file (a FIFO)"


def test_a_folder_and_an_oversized_file_are_refused(tmp_path):
    with pytest.raises(ImageError, match="a folder"):
        read_bytes(tmp_path)
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    with pytest.raises(ImageError, match="too large"):
        read_bytes(tmp_path / "big.jpg", limit=99)


def test_a_hanging_decode_is_skipped_not_waited_for(tmp_path, monkeypatch):
    release = threading.Event()
    real = reader.read_image

    def maybe_hang(path, *a, **k):
        if str(path).endswith("hang.png"):
            release.wait(10)
        return real(path, *a, **k)

    monkeypatch.setattr(reader, "read_image", maybe_hang)
    paths = [make_image(tmp_path / n, (1, 2, 3)) for n in ("a.png", "hang.png", "b.png")]
    results = bounded(lambda: list(read_images(paths, [Target(8)], timeout=0.5)))
    release.set()
    assert isinstance(results[1], ImageError) and "longer than" in str(results[1])
    assert results[0].outputs[0].shape == (8, 8, 3) and results[2].outputs[0].shape == (8, 8, 3)


def test_a_slow_network_in_the_reader_threads_is_not_a_decode_timeout(tmp_path):
    paths = [make_image(tmp_path / n, (1, 2, 3)) for n in ("a.png", "b.png")]
    gate = threading.Event()

    def slow_network(rgb):
        gate.wait(1.0)  # longer than the timeout: only the decoding is timed
        return rgb.mean(axis=(0, 1))

    results = bounded(lambda: list(read_images(paths, [Target(8, then=slow_network)], timeout=0.3)))
    assert not any(isinstance(r, ImageError) for r in results)
    assert [r.outputs[0].shape for r in results] == [(3,), (3,)]


def test_a_stuck_reader_does_not_keep_the_process_alive(tmp_path):
    make_image(tmp_path / "a.png", (1, 2, 3))
    script = (
        "import threading, sys\n"
        "from featurepipe import reader\n"
        "reader.read_image = lambda *a, **k: threading.Event().wait()\n"
        f"[r] = reader.read_images([{str(tmp_path / 'a.png')!r}], [reader.Target(8)], timeout=0.2)\n"
        "print(r)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "longer than" in done.stdout


def test_read_ahead_is_bounded(tmp_path, monkeypatch):
    paths = [make_image(tmp_path / f"{i}.png", (1, 2, 3)) for i in range(20)]
    calls = []
    real = reader.read_image
    monkeypatch.setattr(reader, "read_image", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    stream = read_images(paths, [Target(8)], prefetch=3, workers=2)
    first = next(stream)
    assert not isinstance(first, ImageError) and len(calls) <= 4   # 3 ahead + the next one submitted
    assert len(list(stream)) == 19 and len(calls) == 20


def test_symlink_loops_visit_each_real_folder_once(tmp_path):
    root = make_dataset(tmp_path / "ds", n_per_class=1, classes=("red", "blue"))
    (root / "red" / "x").mkdir()
    os.symlink("..", root / "red" / "x" / "up")          # a loop back to red/
    os.symlink(root, root / "blue" / "all")              # a loop to the root
    index = bounded(lambda: list_images(root))
    assert index.paths == ["blue/img_000.png", "red/img_000.png"]
    assert bounded(lambda: len(walk_images(root))) == 2


def test_the_output_folder_is_never_listed(tmp_path):
    root = make_dataset(tmp_path / "data", n_per_class=2, classes=("red", "blue"))
    make_image(root / "features" / "red" / "x.png", COLORS["red"])
    index = list_images(root, exclude=[root / "features"])
    assert index.class_names == ["blue", "red"] and not any("features" in p for p in index.paths)
    assert len(list_images(root, exclude=[root / "red" / "nothing-yet"])) == 5   # not made: no effect


def test_expand_paths_walks_as_list_images_does(tmp_path):
    root = make_dataset(tmp_path / "d", n_per_class=2, classes=("red",))
    make_image(root / ".hidden" / "h.png", COLORS["red"])
    os.symlink("..", root / "red" / "loop")
    os.mkfifo(root / "red" / "pipe.jpg")
    found = bounded(lambda: expand_paths([root, root / "red" / "img_000.png"]))
    assert [p.relative_to(root).as_posix() for p in found] == [
        "red/img_000.png", "red/img_001.png", "red/pipe.jpg", "red/img_000.png"]


def test_csv_rows_outside_the_manifest_folder_are_refused_unless_allowed(tmp_path):
    make_dataset(tmp_path / "m" / "imgs", n_per_class=1, classes=("red",))
    outside = make_image(tmp_path / "outside" / "x.png", COLORS["red"])
    for row in ("../outside/x.png", str(outside)):
        (tmp_path / "m" / "list.csv").write_text(f"imgs/red/img_000.png,red\n{row},red\n")
        with pytest.raises(DataError, match="outside the manifest's folder.*--allow-outside"):
            list_images(tmp_path / "m" / "list.csv")
        index = list_images(tmp_path / "m" / "list.csv", allow_outside=True)
        assert index.paths == sorted(["imgs/red/img_000.png", str(outside)])


def test_scaled_decode_keeps_twice_the_input_size(tmp_path):
    data = _photo(tmp_path / "p.jpg", size=(1600, 1200)).read_bytes()
    full = decode_bytes(data)
    small = decode_bytes(data, draft_side=2 * 64)
    assert full.shape == (1200, 1600, 3) and small.shape == (150, 200, 3)   # 1/8 keeps >= 128
    assert decode_bytes(data, draft_side=2 * 224).shape == (600, 800, 3)    # 1/2: 1/4 leaves 300
    exact, scaled = decode_targets(data, [Target(64, decode="exact"), Target(64, decode="scaled")])
    assert np.abs(exact.astype(int) - scaled.astype(int)).mean() < 2


def test_several_targets_equal_each_target_alone(tmp_path):
    data = _photo(tmp_path / "p.jpg").read_bytes()
    targets = [Target(64, "stretch", "scaled"), Target(100, "crop", "scaled"), Target(64, "pad", "exact")]
    together = decode_targets(data, targets)
    for target, array in zip(targets, together):
        np.testing.assert_array_equal(array, decode_targets(data, [target])[0])


def test_png_and_small_images_are_unaffected_by_scaled_decoding(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(png, format="PNG")
    jpeg = _photo(tmp_path / "small.jpg", size=(120, 90)).read_bytes()
    for data in (png.getvalue(), jpeg):
        np.testing.assert_array_equal(decode_targets(data, [Target(32, decode="scaled")])[0],
                                      decode_targets(data, [Target(32, decode="exact")])[0])
