"""Wrong arguments: one line on stderr naming the fix, exit code 2, in the CLI and the same
refusal (UsageError) from the library function it wraps."""

import warnings

import numpy as np
import pytest

from conftest import make_dataset, make_image
from featurepipe import chunks, compare, extract, fit, predict, verify
from featurepipe.cli import run_main
from featurepipe.errors import DataError, UsageError


def _one_line_exit_2(module, argv, capsys, *needles):
    code = run_main(module.main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--image-size", "8"], "--image-size"),
    (["--image-size", "100000"], "--image-size"),
    (["--workers", "-1"], "--workers"),
    (["--workers", "0"], "--workers"),
    (["--workers", "100000000"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--backbone", "squeezenet", "--preprocess", "tf"], "--preprocess"),
])
def test_extract_refuses(argv, needle, tiny_data, tmp_path, capsys):
    base = ["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--quiet", "--no-verify"]
    if "--backbone" not in argv:
        base += ["--backbone", "squeezenet"]
    _one_line_exit_2(extract, base + argv, capsys, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [dict(image_size=8), dict(image_size=100000), dict(workers=-1),
                                     dict(workers=0), dict(seed=-1), dict(preprocess="tf")])
def test_extract_function_refuses_what_the_cli_refuses(options, tiny_data, tmp_path):
    with pytest.raises(UsageError):
        extract.extract(tiny_data, ["squeezenet"], out=tmp_path / "out", quiet=True, verify=0, **options)


def test_preprocess_equal_to_the_registry_one_is_accepted():
    from featurepipe.backbones import get_backbone

    assert get_backbone("squeezenet", preprocess_mode="caffe").preprocess == "caffe"


def test_an_image_size_too_small_for_the_network_names_the_option(tiny_data, tmp_path):
    with pytest.raises(UsageError, match=r"--image-size 64 does not fit 'inception_v3'.*75"):
        extract.extract(tiny_data, ["inception_v3"], out=tmp_path / "out", image_size=64,
                        weights="none", engine="tf", quiet=True, verify=0)


def test_an_unknown_layer_is_the_first_and_only_complaint(tiny_data, tiny_model_path, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="has no layer 'nonexistent'"):
            extract.extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "out", preprocess="scale",
                            layer="nonexistent", engine="auto", quiet=True, verify=0)
    assert not [str(w.message) for w in caught if "engine" in str(w.message)]


@pytest.mark.parametrize("module, argv, needle", [
    (fit, ["--seed", "-1"], "--seed"),
    (compare, ["--seed", "-1"], "--seed"),
    (compare, ["--cv", "1"], "--cv"),
    (verify, ["x.h5", "--tolerance", "-1"], "--tolerance"),
    (verify, ["x.h5", "--tolerance", "nan"], "--tolerance"),
    (verify, ["x.h5", "--seed", "-1"], "--seed"),
    (verify, ["x.h5", "--sample", "-1"], "--sample"),
])
def test_other_stages_refuse(module, argv, needle, capsys):
    _one_line_exit_2(module, argv, capsys, needle)


def test_library_functions_refuse_like_their_clis(tmp_path):
    with pytest.raises(UsageError, match="--tolerance"):
        verify.verify(tmp_path / "x.h5", tolerance=-1)
    with pytest.raises(UsageError, match="--seed"):
        fit.fit([tmp_path / "x.h5"], seed=-1)
    with pytest.raises(UsageError, match="--cv"):
        compare.compare([tmp_path / "x.h5"], cv=1)
    with pytest.raises(UsageError, match="--workers"):
        predict.predict(tmp_path / "m.joblib", [tmp_path], workers=0)


def test_predict_csv_in_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    image = make_image(tmp_path / "a.png", (1, 2, 3))
    _one_line_exit_2(predict, ["--model", str(tmp_path / "m.joblib"), "--csv", "/missing/dir/x.csv",
                               str(image)], capsys, "--csv", "/missing/dir")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_features_are_one_line_for_fit_and_compare(bad, tmp_path, capsys):
    from featurefiles import separable, write_features

    X, y, paths, split = separable(dim=6)
    X[5, 2] = bad
    path = write_features(tmp_path / "synth" / "f.h5", X, y, paths, split)
    for module in (fit, compare):
        _one_line_exit_2(module, ["--features", str(path), "--cv", "2"], capsys, "NaN or infinite", paths[5])
    with pytest.raises(DataError):
        fit.fit([path], "logreg", cv=2)


def test_a_timed_out_image_is_retried_by_the_next_run(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    import functools
    import threading

    from featurepipe.store import load

    import featurepipe.reader as reader

    release = threading.Event()
    real_read = reader.read_image

    def hang_once(path, *args, **kwargs):
        if str(path).endswith("img_000.png") and "/red/" in str(path):
            release.wait(30)  # bounded: the test cannot hang
        return real_read(path, *args, **kwargs)

    args = dict(out=tmp_path / "out", preprocess="scale", engine="tf", quiet=True, verify=0)
    with monkeypatch.context() as mp:
        mp.setattr(reader, "read_image", hang_once)
        mp.setattr(chunks, "read_images", functools.partial(reader.read_images, timeout=0.5))
        [first] = extract.extract(tiny_data, [f"file:{tiny_model_path}"], **args)
    release.set()
    assert first.n_rows == 17 and [p for p, _ in load(first.path).skipped] == ["red/img_000.png"]
    [again] = extract.extract(tiny_data, [f"file:{tiny_model_path}"], **args)
    assert again.n_rows == 18 and again.n_extracted == 1 and load(again.path).skipped == []


def test_images_next_to_class_folders_and_unreadable_folders_are_named(tmp_path, monkeypatch):
    import os

    from featurepipe.images import list_images

    root = make_dataset(tmp_path / "d", n_per_class=2)
    make_image(root / "stray.jpg", (1, 2, 3))
    real_scandir = os.scandir

    def scandir_with_a_locked_folder(path="."):
        if str(path).endswith("green"):  # as listing a folder without read permission does
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_with_a_locked_folder)
    with pytest.warns(UserWarning) as caught:
        index = list_images(root)
    messages = " | ".join(str(w.message) for w in caught)
    assert "stray.jpg" in messages and "outside any class folder" in messages
    assert "cannot read folder" in messages and "green" in messages and "Permission denied" in messages
    assert "stray.jpg" not in " ".join(index.paths)


def test_a_weights_file_that_is_not_weights_is_one_line(tiny_data, tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_text("not weights")
    _one_line_exit_2(extract, ["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--quiet",
                               "--no-verify", "--backbone", "squeezenet", "--weights", str(junk),
                               "--engine", "tf"], capsys, "junk.h5")


def test_an_output_folder_that_cannot_be_made_is_one_line(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_exit_2(extract, ["--data", str(tiny_data), "--out", str(blocker / "out"), "--quiet",
                               "--backbone", "squeezenet"], capsys, "output folder")


def test_an_unknown_dask_address_scheme_is_one_line(tiny_data, tmp_path, capsys):
    pytest.importorskip("distributed")
    _one_line_exit_2(extract, ["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--quiet",
                               "--backbone", "squeezenet", "--dask", "bogus://x"], capsys, "bogus")


def test_predict_on_a_path_that_does_not_exist_is_one_line(tmp_path, capsys):
    model = tmp_path / "m.joblib"
    model.write_bytes(b"")
    _one_line_exit_2(predict, ["--model", str(model), str(tmp_path / "missing_dir")], capsys,
                     "missing_dir")


def test_a_link_to_a_folder_above_the_data_is_not_followed(tmp_path):
    from featurepipe.images import list_images

    root = make_dataset(tmp_path / "d", n_per_class=2)
    make_image(tmp_path / "elsewhere" / "x.png", (9, 9, 9))  # around the data set, not in it
    (root / "red" / "up").symlink_to("../..")
    with pytest.warns(UserWarning, match="not followed"):
        index = list_images(root)
    assert len(index.paths) == 6 and not any("elsewhere" in p or "/up/" in p for p in index.paths)


def test_a_csv_row_through_a_link_leaving_the_folder_is_refused(tmp_path):
    from featurepipe.images import list_images

    outside = make_image(tmp_path / "outside" / "x.png", (9, 9, 9))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "link").symlink_to(outside.parent)
    make_image(folder / "in.png", (1, 1, 1))
    (folder / "m.csv").write_text("in.png,a\nlink/x.png,b\n")
    with pytest.raises(DataError, match="outside the manifest"):
        list_images(folder / "m.csv")
    assert len(list_images(folder / "m.csv", allow_outside=True).paths) == 2
