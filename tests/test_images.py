import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import COLORS, make_dataset, make_image
from featurepipe.errors import DataError, ImageError, UsageError
from featurepipe.images import assign_split, list_images, split_hash
from featurepipe.reader import decode_bytes, load_image, resize_array


def test_class_folders_sorted_relative_paths_and_extensions(tmp_path):
    root = make_dataset(tmp_path / "d", n_per_class=2, classes=("red", "blue"))
    make_image(root / "blue" / "UPPER.JPG", COLORS["blue"], fmt="JPEG")
    make_image(root / "blue" / "nested" / "deep.jpeg", COLORS["blue"], fmt="JPEG")
    (root / "blue" / "notes.txt").write_text("not an image")
    make_image(root / "blue" / ".hidden.png", COLORS["blue"])
    make_image(root / ".cache" / "x.png", COLORS["blue"])
    index = list_images(root)
    assert index.class_names == ["blue", "red"]
    assert index.paths == sorted(index.paths)
    assert "blue/UPPER.JPG" in index.paths and "blue/nested/deep.jpeg" in index.paths
    assert not any("notes" in p or ".hidden" in p or ".cache" in p for p in index.paths)
    assert [index.class_names[y] for y in index.labels] == [p.split("/")[0] for p in index.paths]
    assert index.given_split is None


def test_split_level_is_kept_as_given(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        make_dataset(tmp_path / "d" / split, n_per_class=n, classes=("red", "green"))
    index = list_images(tmp_path / "d")
    assert index.class_names == ["green", "red"]
    assert index.given_split == [p.split("/")[0] for p in index.paths]
    assert index.given_split.count("test") == 4


def test_csv_manifest(tmp_path):
    root = make_dataset(tmp_path / "imgs", n_per_class=2, classes=("red", "green"))
    rows = ["path,label,split"] + [f"imgs/{c}/img_{i:03d}.png,{c},{'test' if i else 'train'}"
                                   for c in ("red", "green") for i in range(2)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    index = list_images(tmp_path / "m.csv")
    assert index.root == tmp_path.resolve()
    assert index.paths[0] == "imgs/green/img_000.png"
    assert index.given_split == ["train", "test", "train", "test"]
    assert root.exists()


def test_no_images_and_missing_data_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        with pytest.warns(UserWarning, match="no images"):
            list_images(tmp_path / "empty")
    with pytest.raises(UsageError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        list_images(tmp_path / "flat")


def test_empty_class_folder_warns(tmp_path):
    root = make_dataset(tmp_path / "d", n_per_class=2, classes=("red",))
    (root / "zzz").mkdir()
    with pytest.warns(UserWarning, match="'zzz' has no images"):
        index = list_images(root)
    assert index.empty_classes == ["zzz"]


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_unusual_valid_images_become_rgb():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "gray": _encode(Image.fromarray(rgb).convert("L"), "PNG"),
        "rgba": _encode(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "palette": _encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "cmyk": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "gif": _encode(Image.fromarray(rgb).convert("P"), "GIF"),
        "bmp": _encode(Image.fromarray(rgb), "BMP"),
        "webp": _encode(Image.fromarray(rgb), "WEBP"),
        "tif": _encode(Image.fromarray(rgb), "TIFF"),
    }
    for name, data in cases.items():
        out = decode_bytes(data)
        assert out.shape == (10, 20, 3) and out.dtype == np.uint8, name
    assert abs(int(decode_bytes(cases["rgba"])[0, 0, 0]) - 200) <= 2


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((6, 6), 32768, dtype=np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    out = decode_bytes(data)
    assert out.shape == (6, 6, 3)
    assert 120 <= out[0, 0, 0] <= 135  # half scale, not 255


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (30, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_bytes(_encode(img, "JPEG", exif=exif))
    assert out.shape == (30, 10, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 5, "not an image"),
    (os.urandom(5000), "not an image"),
])
def test_bad_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_bytes(data)


def test_truncated_jpeg_and_bomb_are_refused():
    rng = np.random.default_rng(0)
    jpeg = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError):
        decode_bytes(jpeg[: len(jpeg) // 2])
    big = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageError, match="pixels"):
        decode_bytes(big, max_pixels=1_000_000)


def test_resize_modes_and_load_image(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    assert resize_array(rgb, 10, "stretch").shape == (10, 10, 3)
    crop = resize_array(rgb, 10, "crop")
    assert crop.shape == (10, 10, 3) and crop[:, 0].mean() == 255 and crop[:, -1].mean() == 0
    pad = resize_array(rgb, 10, "pad")
    assert pad.shape == (10, 10, 3) and pad[0].max() == 0 and pad[5, 0, 0] == 255
    path = make_image(tmp_path / "a.png", (1, 2, 3))
    img, sha1 = load_image(path, 16)
    assert img.shape == (16, 16, 3) and len(sha1) == 40
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png", 16)


def test_split_is_stratified_deterministic_and_seeded():
    paths = [f"c{c}/img{i}.jpg" for c in range(3) for i in range(50)]
    labels = np.repeat(np.arange(3), 50)
    a = assign_split(paths, labels, test_size=0.2, val_size=0.1, seed=0)
    b = assign_split(paths, labels, test_size=0.2, val_size=0.1, seed=0)
    c = assign_split(paths, labels, test_size=0.2, val_size=0.1, seed=1)
    assert a == b and a != c
    for k in range(3):
        per_class = a[k * 50:(k + 1) * 50]
        assert per_class.count("test") == 10 and per_class.count("val") == 5


def test_split_of_new_images_comes_from_their_hash_and_old_ones_stay():
    paths = [f"c/img{i}.jpg" for i in range(100)]
    first = assign_split(paths, np.zeros(100), test_size=0.2, val_size=0, seed=3)
    grown = paths + [f"c/new{i}.jpg" for i in range(1000)]
    second = assign_split(grown, np.zeros(1100), test_size=0.2, val_size=0, seed=3,
                          known=dict(zip(paths, first)))
    assert second[:100] == first
    new_splits = second[100:]
    assert all((s == "test") == (split_hash(3, p) < 0.2) for p, s in zip(grown[100:], new_splits))
    assert 0.15 < new_splits.count("test") / 1000 < 0.25


def test_small_classes_keep_a_train_image():
    split = assign_split(["a/1", "a/2", "b/1"], [0, 0, 1], test_size=0.5, val_size=0.4, seed=0)
    assert split[2] == "train" and sorted(split[:2]) == ["test", "train"]
