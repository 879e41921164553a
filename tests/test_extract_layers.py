"""extract with several --layer values: one forward pass per image, one normal file per layer."""

from pathlib import Path

import numpy as np
import pytest

import featurepipe.chunks as chunks_module
from conftest import make_dataset
from featurepipe.compare import compare
from featurepipe.engines import FeatureModel
from featurepipe.extract import extract, main
from featurepipe.store import load, read_attrs

LAYERS = ["conv_b", "pool_a"]  # not in graph order
RUN = dict(preprocess="scale", quiet=True, verify=0, engine="tf", chunk_size=4, batch_size=2)


def _run(data, model_path, out, layer, **kw):
    return extract(data, [f"file:{model_path}"], out=out, layer=layer, **{**RUN, **kw})


def _same_file(a, b):
    fa, fb = load(a), load(b)
    assert list(fa.paths) == list(fb.paths) and list(fa.split) == list(fb.split)
    np.testing.assert_array_equal(fa.y, fb.y)
    np.testing.assert_allclose(fa.X, fb.X, rtol=1e-5, atol=1e-6)
    assert fa.skipped == fb.skipped


@pytest.fixture
def forward_images(monkeypatch):
    """How many images went through the network, over all forward passes."""
    seen = []
    real = FeatureModel.__call__
    monkeypatch.setattr(FeatureModel, "__call__", lambda self, images: seen.append(len(images)) or real(self, images))
    return seen


@pytest.fixture
def saved_parts(monkeypatch):
    """The part files written, as (parts folder name, part name)."""
    saved = []
    real = chunks_module.save_part
    monkeypatch.setattr(chunks_module, "save_part",
                        lambda path, **part: saved.append((Path(path).parent.name, Path(path).name))
                        or real(path, **part))
    return saved


def test_two_layers_in_one_pass_equal_two_single_layer_runs(tiny_data, tiny_model_path, tmp_path, forward_images):
    both = _run(tiny_data, tiny_model_path, tmp_path / "both", LAYERS)
    assert sum(forward_images) == 18  # every image through the network once, for both layers
    assert [r.path.name for r in both] == ["tiny@conv_b.h5", "tiny@pool_a.h5"]
    for layer, result, dim in zip(LAYERS, both, (16, 8)):
        (single,) = _run(tiny_data, tiny_model_path, tmp_path / layer, layer)
        assert single.path.name == result.path.name
        _same_file(single.path, result.path)
        attrs = read_attrs(result.path)
        assert attrs["layer"] == layer and attrs["feature_dim"] == dim
    assert not list((tmp_path / "both").glob(".*.parts"))


def test_the_summary_of_a_several_file_pass_says_its_time_is_shared(tiny_data, tiny_model_path, tmp_path):
    both = _run(tiny_data, tiny_model_path, tmp_path / "both", LAYERS)
    assert all(r.files_in_pass == 2 and "for the 2 files of one pass" in r.summary() for r in both)
    (single,) = _run(tiny_data, tiny_model_path, tmp_path / "one", LAYERS[0])
    assert single.files_in_pass == 1 and "of one pass" not in single.summary()


def test_a_complete_layer_file_is_not_extracted_again(tiny_data, tiny_model_path, tmp_path,
                                                       forward_images, saved_parts):
    out = tmp_path / "out"
    (first,) = _run(tiny_data, tiny_model_path, out, "conv_b")
    forward_images.clear(), saved_parts.clear()
    _run(tiny_data, tiny_model_path, out, LAYERS)
    assert sum(forward_images) == 18  # pool_a needs every image
    assert {folder for folder, _ in saved_parts} == {".tiny@pool_a.parts"}
    make_dataset(tiny_data, n_per_class=1, classes=("red",), start=50)
    forward_images.clear(), saved_parts.clear()
    grown = _run(tiny_data, tiny_model_path, out, LAYERS)
    assert sum(forward_images) == 1 and [r.n_extracted for r in grown] == [1, 1]
    assert {folder for folder, _ in saved_parts} == {".tiny@conv_b.parts", ".tiny@pool_a.parts"}


def test_resume_after_a_crash_redoes_only_missing_parts_of_each_layer(tmp_path, tiny_model_path, monkeypatch,
                                                                     forward_images):
    data = make_dataset(tmp_path / "d", n_per_class=10)
    clean = _run(data, tiny_model_path, tmp_path / "clean", LAYERS)
    saved = []
    real = chunks_module.save_part

    def crashing(path, **part):
        if len(saved) == 3:  # chunk 0 of both files and chunk 1 of the first are on disk
            raise RuntimeError("simulated crash")
        saved.append(Path(path))
        return real(path, **part)

    monkeypatch.setattr(chunks_module, "save_part", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(data, tiny_model_path, tmp_path / "resumed", LAYERS)
    assert [p.parent.name for p in saved] == [".tiny@conv_b.parts", ".tiny@pool_a.parts", ".tiny@conv_b.parts"]
    redone = []
    monkeypatch.setattr(chunks_module, "save_part", lambda path, **part: redone.append(Path(path)) or real(path, **part))
    forward_images.clear()
    resumed = _run(data, tiny_model_path, tmp_path / "resumed", LAYERS)
    assert len(redone) == 1 + 2 * 6 and not set(redone) & set(saved)  # 30 images / 4 = 8 chunks
    assert sum(forward_images) == 30 - 4  # chunk 0 is in both files' parts
    assert [r.n_resumed for r in resumed] == [8, 4]
    for a, b in zip(clean, resumed):
        _same_file(a.path, b.path)


def test_compare_treats_each_layer_file_as_a_feature_set(tiny_data, tiny_model_path, tmp_path):
    _run(tiny_data, tiny_model_path, tmp_path / "out", [None, *LAYERS])  # None: the default layer
    rows = compare(None, ["knn"], cv=2, n_jobs=1, plots=False, report=False)  # the latest run's files
    assert sorted(r["features"] for r in rows) == ["tiny", "tiny+tiny@conv_b+tiny@pool_a", "tiny@conv_b",
                                                   "tiny@pool_a"]


@pytest.mark.parametrize("layers, needle", [
    (["conv_a", "nonexistent", "other"], "has no layer 'nonexistent'"),
    (["conv_a", "conv_a"], "'conv_a' is named twice"),
])
def test_each_layer_is_checked_one_line_exit_2(layers, needle, tiny_data, tiny_model_path, tmp_path, capsys):
    argv = ["--data", str(tiny_data), "--backbone", f"file:{tiny_model_path}", "--preprocess", "scale",
            "--out", str(tmp_path / "out"), "--quiet", "--no-verify", "--engine", "tf"]
    from featurepipe.cli import run_main

    assert run_main(main, argv + [a for layer in layers for a in ("--layer", layer)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_several_layers_with_dask_are_refused(tiny_data, tiny_model_path, tmp_path):
    from featurepipe.errors import UsageError

    with pytest.raises(UsageError, match="leave out --dask"):
        _run(tiny_data, tiny_model_path, tmp_path / "out", LAYERS, dask="local:1")
