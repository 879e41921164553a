import io
import os
import shutil
import warnings
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import COLORS, make_dataset, make_image
from featurepipe import chunks as chunks_module
from featurepipe import extract as extract_module
from featurepipe.cli import run_main
from featurepipe.errors import DataError, UsageError
from featurepipe.extract import extract, latest_pointer, main
from featurepipe.planning import OutputLock
from featurepipe.store import load

ROOT = Path(__file__).resolve().parents[1]


def _run(data, model_path, out, **kw):
    kw.setdefault("preprocess", "scale")
    kw.setdefault("quiet", True)
    return extract(data, [f"file:{model_path}"], out=out, **kw)[0]


def _same_file(a, b):
    fa, fb = load(a), load(b)
    assert list(fa.paths) == list(fb.paths)
    assert list(fa.split) == list(fb.split)
    np.testing.assert_array_equal(fa.y, fb.y)
    np.testing.assert_array_equal(fa.X, fb.X)
    assert fa.skipped == fb.skipped


def test_contract_readable_with_plain_h5py(tiny_data, tiny_model_path, tmp_path):
    result = _run(tiny_data, tiny_model_path, tmp_path / "out", test_size=0.25, val_size=0.25)
    assert result.path == tmp_path / "out" / "tiny.h5"
    with h5py.File(result.path, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (18, 16)
        paths = list(f["paths"].asstr()[()])
        assert paths == sorted(paths) and all("\\" not in p for p in paths)
        classes = list(f["class_names"].asstr()[()])
        assert classes == ["blue", "green", "red"]
        labels = f["labels"][()]
        assert [classes[k] for k in labels] == [p.split("/")[0] for p in paths]
        split = list(f["split"].asstr()[()])
        for c in range(3):
            per_class = [s for s, k in zip(split, labels) if k == c]
            assert per_class.count("test") == 2 and per_class.count("val") == 2
        assert f["file_size"].shape == (18,) and (f["file_size"][()] > 0).all()
        assert f["mtime_ns"].shape == (18,) and len(f["sha1"].asstr()[0]) == 40
        assert f["skipped"].shape == (0, 2)
        attrs = dict(f.attrs)
    for key in ("backbone", "layer", "pooling", "image_size", "resize", "preprocess", "augment",
                "weights_source", "weights_sha256", "featurepipe_version", "tensorflow_version",
                "data_root", "created", "engine", "seed"):
        assert key in attrs, key
    assert attrs["data_root"] == str(tiny_data.resolve()) and attrs["image_size"] == 32
    assert latest_pointer().exists()


def test_features_equal_a_direct_forward_pass(tiny_data, tiny_model_path, tmp_path):
    import keras

    result = _run(tiny_data, tiny_model_path, tmp_path / "out", pooling="max", layer="conv_a")
    f = load(result.path)
    model = keras.models.load_model(tiny_model_path)
    cut = keras.Model(model.inputs, model.get_layer("conv_a").output)
    img = np.asarray(Image.open(tiny_data / f.paths[0]).convert("RGB").resize((32, 32), Image.BILINEAR))
    expected = cut.predict(img[None].astype("float32") / 255.0, verbose=0).max(axis=(1, 2))
    np.testing.assert_allclose(f.X[0], expected[0], rtol=1e-5, atol=1e-6)


def test_flip_augment_averages_image_and_mirror(tiny_data, tiny_model_path, tmp_path):
    plain = load(_run(tiny_data, tiny_model_path, tmp_path / "out").path)
    result = _run(tiny_data, tiny_model_path, tmp_path / "out", augment="flip")
    assert result.path.name == "tiny-flip.h5"
    flipped = load(result.path)
    assert flipped.attrs["augment"] == "flip"
    assert not np.allclose(plain.X, flipped.X)


def test_resume_after_crash_redoes_only_missing_chunks(tmp_path, tiny_model_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_per_class=10)
    clean = _run(data, tiny_model_path, tmp_path / "clean", chunk_size=4, batch_size=2)
    saved = []
    real = chunks_module.save_part

    def crashing(path, **part):
        if len(saved) == 3:
            raise RuntimeError("simulated crash")
        saved.append(Path(path).name)
        return real(path, **part)

    monkeypatch.setattr(chunks_module, "save_part", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(data, tiny_model_path, tmp_path / "resumed", chunk_size=4, batch_size=2)
    assert not (tmp_path / "resumed" / "tiny.h5").exists()
    assert len(list((tmp_path / "resumed" / ".tiny.parts").glob("part-*.npz"))) == 3
    redone = []
    monkeypatch.setattr(chunks_module, "save_part",
                        lambda path, **part: redone.append(Path(path).name) or real(path, **part))
    result = _run(data, tiny_model_path, tmp_path / "resumed", chunk_size=4, batch_size=2)
    assert len(redone) == 5 and not set(redone) & set(saved)  # 30 images / 4 = 8 chunks
    assert result.n_rows == 30
    _same_file(clean.path, result.path)
    assert not (tmp_path / "resumed" / ".tiny.parts").exists()


def test_kill_9_mid_run_then_rerun_equals_clean_run(tmp_path, tiny_model_path):
    data = make_dataset(tmp_path / "d", n_per_class=16)
    clean = _run(data, tiny_model_path, tmp_path / "clean", chunk_size=4, batch_size=4)
    out = tmp_path / "killed"
    script = (
        "import sys, time\n"
        "from featurepipe import chunks, extract as e\n"
        "real = chunks.save_part\n"
        "def slow(*a, **k):\n"
        "    r = real(*a, **k); time.sleep(0.4); return r\n"
        "chunks.save_part = slow\n"
        f"e.extract({str(data)!r}, ['file:{tiny_model_path}'], out={str(out)!r}, preprocess='scale',"
        " quiet=True, chunk_size=4, batch_size=4)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    parts = out / ".tiny.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("part-*.npz")))
    assert 3 <= done_before < 12 and not (out / "tiny.h5").exists()
    result = _run(data, tiny_model_path, out, chunk_size=4, batch_size=4)
    assert result.n_rows == 48
    _same_file(clean.path, result.path)


def test_incremental_add_remove_edit(tmp_path, tiny_model_path):
    data = make_dataset(tmp_path / "d", n_per_class=10)
    out = tmp_path / "out"
    first = _run(data, tiny_model_path, out)
    before = load(first.path)
    make_dataset(data, n_per_class=2, start=10, classes=("red",))          # 2 new
    (data / "blue" / "img_000.png").unlink()                              # 1 removed
    make_image(data / "green" / "img_001.png", (250, 250, 250), seed=99)  # 1 edited
    os.utime(data / "green" / "img_002.png")                              # touched, same bytes
    second = _run(data, tiny_model_path, out)
    assert second.n_extracted == 3 and second.n_rows == 31
    after = load(second.path)
    assert "blue/img_000.png" not in set(after.paths)
    old = dict(zip(before.paths, before.X))
    new = dict(zip(after.paths, after.X))
    assert not np.allclose(old["green/img_001.png"], new["green/img_001.png"])
    for p in before.paths:
        if p not in ("blue/img_000.png", "green/img_001.png"):
            np.testing.assert_array_equal(old[p], new[p])
    old_split = dict(zip(before.paths, before.split))
    assert all(old_split[p] == s for p, s in zip(after.paths, after.split) if p in old_split)
    third = _run(data, tiny_model_path, out)
    assert third.n_extracted == 0 and third.n_rows == 31


def test_other_backbone_files_share_the_split(tmp_path, tiny_model_path):
    data = make_dataset(tmp_path / "d", n_per_class=10)
    first = _run(data, tiny_model_path, tmp_path / "out")
    make_dataset(data, n_per_class=10, start=10)
    twin = tmp_path / "twin.keras"
    shutil.copy(tiny_model_path, twin)
    second = _run(data, twin, tmp_path / "out")
    a, b = load(first.path), load(second.path)
    split_b = dict(zip(b.paths, b.split))
    assert all(split_b[p] == s for p, s in zip(a.paths, a.split))


def test_other_settings_refused_unless_overwrite(tiny_data, tiny_model_path, tmp_path):
    _run(tiny_data, tiny_model_path, tmp_path / "out")
    with pytest.raises(UsageError, match="other settings: pooling='avg' \\(now 'max'\\).*--overwrite"):
        _run(tiny_data, tiny_model_path, tmp_path / "out", pooling="max")
    result = _run(tiny_data, tiny_model_path, tmp_path / "out", pooling="max", overwrite=True)
    assert load(result.path).attrs["pooling"] == "max"


def test_second_writer_is_refused(tiny_data, tiny_model_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / ".tiny.h5.lock"):
        with pytest.raises(UsageError, match="another featurepipe run"):
            _run(tiny_data, tiny_model_path, out)


def _bad_and_odd_files(root):
    rng = np.random.default_rng(0)
    c = root / "red"
    (c / "zero.jpg").write_bytes(b"")
    (c / "text.jpg").write_text("this is not a picture\n" * 20)
    (c / "random.png").write_bytes(rng.bytes(3000))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (c / "truncated.jpg").write_bytes(buf.getvalue()[:600])
    Image.new("L", (3000, 3000)).save(c / "bomb.png")
    Image.new("L", (30, 30), 128).save(c / "gray.png")
    Image.new("CMYK", (30, 30), (0, 200, 200, 0)).save(c / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(c / "deep16.png")
    Image.new("RGBA", (30, 30), (200, 0, 0, 100)).save(c / "alpha.png")
    Image.new("P", (30, 30)).save(c / "palette.gif")
    make_image(c / "LOUD.JPG", COLORS["red"], fmt="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(c / "rotated.jpg", exif=exif)


def test_bad_files_are_skipped_recorded_and_odd_ones_used(tiny_data, tiny_model_path, tmp_path, capsys):
    _bad_and_odd_files(tiny_data)
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "out", preprocess="scale",
                       max_pixels=4_000_000)
    f = load(result.path)
    skipped = dict(f.skipped)
    assert set(skipped) == {f"red/{n}" for n in ("zero.jpg", "text.jpg", "random.png", "truncated.jpg", "bomb.png")}
    assert "empty" in skipped["red/zero.jpg"] and "pixels" in skipped["red/bomb.png"]
    for name in ("gray.png", "cmyk.jpg", "deep16.png", "alpha.png", "palette.gif", "LOUD.JPG", "rotated.jpg"):
        assert f"red/{name}" in set(f.paths), name
    assert result.n_rows == 25 and result.n_skipped == 5
    err = capsys.readouterr().err
    assert "5 skipped" in err and "skipped red/zero.jpg: empty file" in err
    [again] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "out", preprocess="scale",
                      max_pixels=4_000_000, quiet=True)
    assert again.n_extracted == 0 and again.n_skipped == 5  # unchanged bad files are not retried


def test_duplicates_are_reported(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    # Record the warning at its source: TensorFlow/absl may route warnings to logging.
    caught = []
    monkeypatch.setattr(warnings, "warn", lambda message, *a, **k: caught.append(str(message)))
    shutil.copy(tiny_data / "red" / "img_000.png", tiny_data / "red" / "copy.png")
    result = _run(tiny_data, tiny_model_path, tmp_path / "out")
    assert result.duplicate_groups == 1
    assert load(result.path).attrs["duplicate_groups"] == 1
    assert any("byte-identical" in m and "red/copy.png" in m for m in caught), caught


def test_all_images_unreadable_is_a_clear_error(tmp_path, tiny_model_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="no readable images"):
        _run(tmp_path / "d", tiny_model_path, tmp_path / "out")


@pytest.mark.parametrize("argv, message", [
    (["--data", "{data}", "--backbone", "alexnet"], "unknown backbone 'alexnet'; known: squeezenet"),
    (["--data", "{tmp}/missing", "--backbone", "squeezenet"], "data not found"),
    (["--backbone", "squeezenet"], "--data is required"),
    (["--data", "{data}", "--backbone", "squeezenet", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "{data}", "--backbone", "squeezenet", "--test-size", "1.5"], "--test-size"),
    (["--data", "{tmp}/empty", "--backbone", "squeezenet"], "no class folders"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, tiny_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(data=tiny_data, tmp=tmp_path) for a in argv]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_subprocess_exit_code_and_list_backbones(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run([sys.executable, "-m", "featurepipe.extract", "--data", str(tmp_path),
                          "--backbone", "nonesuch"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown backbone")
    listing = subprocess.run([sys.executable, "-m", "featurepipe.extract", "--list-backbones"],
                             capture_output=True, text=True, env=env)
    assert listing.returncode == 0
    assert "squeezenet" in listing.stdout and "227" in listing.stdout and "512" in listing.stdout


def test_list_layers(tiny_model_path, capsys):
    assert main(["--list-layers", f"file:{tiny_model_path}"]) == 0
    out = capsys.readouterr().out
    assert "conv_a" in out and "(None, 30, 30, 8)" in out


def test_list_layers_of_a_registry_backbone(capsys):
    assert main(["--list-layers", "squeezenet"]) == 0  # built without weights
    out = capsys.readouterr().out
    assert "fire9 " in out and "(None, 13, 13, 512)" in out


def test_fifo_named_like_an_image_is_recorded_as_skipped(tiny_data, tiny_model_path, tmp_path):
    os.mkfifo(tiny_data / "red" / "pipe.jpg")
    f = load(_run(tiny_data, tiny_model_path, tmp_path / "out").path)
    assert dict(f.skipped)["red/pipe.jpg"] == "not a regular file (a FIFO)" and len(f.paths) == 18


def test_csv_row_for_a_missing_file_is_recorded_as_skipped(tiny_data, tiny_model_path, tmp_path):
    rows = [f"colors/{c}/img_{i:03d}.png,{c}" for c in ("red", "green") for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join(rows + ["colors/red/missing.png,red"]) + "\n")
    result = _run(tmp_path / "m.csv", tiny_model_path, tmp_path / "out")
    f = load(result.path)
    assert result.n_rows == 8 and dict(f.skipped)["colors/red/missing.png"].startswith("file not found")


@pytest.mark.parametrize("module, argv", [
    ("extract", ["--pooling", "min"]),
    ("fit", ["--cv", "abc"]),
    ("compare", ["--bogus"]),
    ("predict", []),
    ("verify", []),
])
def test_bad_options_are_one_line_exit_2(module, argv, capsys):
    import importlib

    cli = importlib.import_module(f"featurepipe.{module}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_nonpositive_limits_are_usage_errors(tiny_data, tmp_path):
    from featurepipe.fit import fit

    with pytest.raises(UsageError, match="--max-pixels"):
        extract(tiny_data, ["squeezenet"], out=tmp_path / "o", max_pixels=-1)
    with pytest.raises(UsageError, match="--max-seconds"):
        fit([tmp_path / "none.h5"], "svm", max_seconds=-1)


def test_broken_symlink_is_recorded_as_skipped(tiny_data, tiny_model_path, tmp_path):
    os.symlink(tmp_path / "nowhere.jpg", tiny_data / "red" / "dangling.jpg")
    f = load(_run(tiny_data, tiny_model_path, tmp_path / "out").path)
    assert "red/dangling.jpg" in dict(f.skipped) and len(f.paths) == 18


def test_a_rerun_with_nothing_to_do_builds_no_engine(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    import featurepipe.engines.model  # noqa: F401  (patched below)
    import featurepipe.engines as engines

    args = dict(out=tmp_path / "f", preprocess="scale", quiet=True, verify=0)
    [first] = extract(tiny_data, [f"file:{tiny_model_path}"], engine="tf", **args)

    def fail(*a, **k):
        raise AssertionError("an engine was built for nothing")

    monkeypatch.setattr(engines.model, "make_engine", fail)
    [again] = extract(tiny_data, [f"file:{tiny_model_path}"], engine="auto", **args)
    assert again.n_extracted == 0 and again.n_rows == first.n_rows
    with h5py.File(again.path) as f:
        assert f.attrs["engine"] == "tf"


def test_an_extracted_image_replaced_by_a_link_to_a_fifo_is_skipped_on_rerun(tiny_data, tiny_model_path, tmp_path):
    from test_reader import bounded

    _run(tiny_data, tiny_model_path, tmp_path / "out")
    os.mkfifo(tmp_path / "pipe")
    os.unlink(tiny_data / "red" / "img_000.png")
    os.symlink(tmp_path / "pipe", tiny_data / "red" / "img_000.png")
    result = bounded(lambda: _run(tiny_data, tiny_model_path, tmp_path / "out"))
    f = load(result.path)
    assert dict(f.skipped)["red/img_000.png"] == "not a regular file (a FIFO)" and result.n_rows == 17


def test_an_output_folder_inside_the_data_is_refused_and_never_listed(tmp_path, tiny_model_path):
    from featurepipe.images import list_images

    data = make_dataset(tmp_path / "data", n_per_class=3)
    out = data / "features"
    with pytest.raises(UsageError, match="inside the image folder"):
        _run(data, tiny_model_path, out)
    assert not out.exists()
    # a folder given as excluded (the output folder) is never walked, whatever it holds
    make_image(out / "stray" / "x.png", COLORS["red"])
    index = list_images(data, exclude=[out])
    assert sorted(set(index.class_names)) == ["blue", "green", "red"] and len(index.paths) == 9


def test_extract_has_an_explicit_keyword_only_signature_matching_options():
    import inspect

    params = inspect.signature(extract_module.extract).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    keyword_only = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(extract_module.Options.__dataclass_fields__) | {"out"} == keyword_only
    with pytest.raises(TypeError):
        extract_module.extract("x", ["squeezenet"], batchsize=3)
