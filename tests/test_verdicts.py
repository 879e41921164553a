"""Every stage gives the reader's verdict on the same bad files (a FIFO, a truncated JPEG, an empty
file), and none of them blocks: each call runs under a bound."""

import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset
from featurepipe import finetune
from featurepipe.errors import ImageError
from featurepipe.extract import extract
from featurepipe.predict import predict
from featurepipe.reader import Target, read_image
from featurepipe.store import load, load_part
from test_reader import bounded

BAD = ("red/pipe.jpg", "red/trunc.jpg", "red/empty.jpg")


def _make_bad(folder):
    """The three bad files in ``folder``; returns {name: the reader's verdict}."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("pipe.jpg", "trunc.jpg", "empty.jpg"):
        (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / "pipe.jpg")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    verdicts = {}
    for name in ("pipe.jpg", "trunc.jpg", "empty.jpg"):
        with pytest.raises(ImageError) as err:
            bounded(lambda: read_image(folder / name, [Target(32, decode="scaled")]))
        verdicts[name] = str(err.value)
    return verdicts


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path):
    """A clean data set, its feature file and a model fitted on it; then the bad files are added."""
    from featurepipe.fit import fit

    root = tmp_path_factory.mktemp("verdicts")
    data = make_dataset(root / "colors", n_per_class=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREPIPE_DATA", str(root / "home"))
        mp.setenv("FEATUREPIPE_MODELS", str(root / "models"))
        [clean] = extract(data, [f"file:{tiny_model_path}"], out=root / "feats", preprocess="scale",
                          quiet=True, engine="tf", verify=0)
        model = fit([clean.path], "logreg", cv=2, n_jobs=1).model
    return data, clean.path, model, _make_bad(data / "red")


def test_extract(world, tiny_model_path, tmp_path):
    data, _, _, verdicts = world
    [result] = bounded(lambda: extract(data, [f"file:{tiny_model_path}"], out=tmp_path / "o",
                                       preprocess="scale", quiet=True, verify=0))
    skipped = dict(load(result.path).skipped)
    assert {p: skipped[p] for p in BAD} == {f"red/{n}": v for n, v in verdicts.items()}


def test_dask_chunk_worker(world, tiny_model_path, tmp_path):
    from featurepipe.backbones import get_backbone
    from featurepipe.settings import make_spec
    from featurepipe.distributed import ChunkJob, run_chunk_job
    from featurepipe.chunks import extract_chunk

    data, _, _, verdicts = world
    spec, resolved = make_spec(get_backbone(f"file:{tiny_model_path}", preprocess_mode="scale"), decode="scaled")
    job = ChunkJob(part_path=str(tmp_path / "part.npz"), paths=BAD + ("red/img_000.png",),
                   abs_paths=tuple(str(data / p) for p in BAD + ("red/img_000.png",)),
                   backbone=f"file:{tiny_model_path}", spec=spec, resolved=resolved, engine="tf",
                   batch_size=2, decode_workers=None, max_pixels=10**8)
    bounded(lambda: run_chunk_job(job, extract_chunk))
    part = load_part(tmp_path / "part.npz")
    assert list(part["paths"]) == ["red/img_000.png"]
    assert dict(zip(part["bad_paths"], part["bad_reasons"])) == {f"red/{n}": v for n, v in verdicts.items()}


def test_transformer(world, tiny_model_path):
    from featurepipe.featurizer import CNNFeatures

    data, _, _, verdicts = world
    features = CNNFeatures(backbone=f"file:{tiny_model_path}", preprocess="scale", engine="tf").fit()
    for name, verdict in verdicts.items():
        with pytest.raises(ImageError) as err:
            bounded(lambda: features.transform([data / "red" / name]))
        assert str(err.value).endswith(f": {verdict}")


def test_predict(world):

    data, _, model, verdicts = world
    answers = bounded(lambda: predict(model, [data / "red"], engine="tf"))
    errors = {os.path.basename(p.path): p.error for p in answers if p.error}
    assert errors == verdicts and len(answers) == 7


def _clean_copy(data, to):
    """A copy of the data set without the bad files (copying a FIFO would fail)."""
    import shutil

    return shutil.copytree(data, to, ignore=shutil.ignore_patterns("pipe.jpg", "trunc.jpg", "empty.jpg"))


def test_verify(world, tmp_path):
    from featurepipe.verify import verify

    data, clean_path, _, _ = world
    copy = _clean_copy(data, tmp_path / "copy")
    verdicts = _make_bad(copy / "red")
    victims = [p for p in load(clean_path, features=False).paths if p.startswith("red/")][:3]
    for victim, name in zip(victims, verdicts):
        os.replace(copy / "red" / name, copy / victim)
    result = bounded(lambda: verify(clean_path, sample=0, data=copy))
    reasons = {m.path: m.reason for m in result.mismatches}
    assert len(result.mismatches) == 3
    for victim, verdict in zip(victims, verdicts.values()):
        assert reasons[victim].endswith(f": {verdict}")


def test_finetune_image_cache_and_predict(world, tiny_model_path, tmp_path):
    import keras

    data, clean_path, _, verdicts = world
    feats = load(clean_path, features=False)
    # the cache of fine-tuning: rows whose image is now bad are left out with the reader's reason
    copy = _clean_copy(data, tmp_path / "copy")
    victim = list(feats.paths).index("red/img_000.png")
    os.unlink(copy / "red" / "img_000.png")
    os.mkfifo(copy / "red" / "img_000.png")
    feats.attrs["data_root"] = str(copy)
    rows = {"train": np.array([victim, victim + 1], dtype=np.int64)}
    work = tmp_path / "work"
    work.mkdir()
    spec = finetune.model.feature_model_of(feats.attrs, None).spec
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        bounded(lambda: finetune.data.decoded_images(feats, rows, spec, work, True))
    assert json.loads((work / "images.json").read_text())["bad"] == {str(victim): verdicts["pipe.jpg"]}
    # a fine-tuned model's predict
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    model_path = tmp_path / "m__finetune.keras"
    keras.Model(inputs, outputs).save(model_path)
    model_path.with_suffix(".json").write_text(json.dumps({
        "class_names": ["blue", "green", "red"], "image_size": 32, "resize": "stretch",
        "attrs": {"decode": "scaled"}}))
    answers = bounded(lambda: predict(model_path, [data / "red"]))
    errors = {os.path.basename(a.path): a.error for a in answers if a.error}
    assert errors == verdicts and len(answers) == 7
