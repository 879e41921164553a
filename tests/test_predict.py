import csv
import json
from pathlib import Path

import joblib
import numpy as np
import pytest

from featurepipe.errors import DataError, UsageError
from featurepipe.extract import extract
from featurepipe.fit import fit
from featurepipe.modelfile import load_user
from featurepipe.cli import run_main
from featurepipe.predict import (MODEL_KINDS, FeaturesModel, FinetunedModel, Prediction, load_model, main,
                                 predict)
from featurepipe.reader import FILE_DECODE_DEFAULT, Target, read_images

from conftest import make_dataset, make_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    """A tiny image set, its features from the tiny Keras model, and a logreg model on them."""
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "colors", n_per_class=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREPIPE_DATA", str(root / "data"))
        mp.setenv("FEATUREPIPE_MODELS", str(root / "models"))
        [res] = extract(data, [f"file:{tiny_model_path}"], preprocess="scale", quiet=True)
        result = fit([res.path], "svm", cv=3, n_jobs=1)
    return data, result.model


def test_predict_round_trips_the_class_names(trained):
    data, model = trained
    preds = predict(model, [data])
    assert len(preds) == 24 and all(isinstance(p, Prediction) for p in preds)
    truth = [p.path.split("/")[-2] for p in preds]
    correct = sum(p.label == t for p, t in zip(preds, truth))
    assert correct >= 21
    assert {p.label for p in preds} <= {"blue", "green", "red"}
    assert all(0 < p.probability <= 1 for p in preds)


def test_predict_reports_bad_images_and_answers_unknown(trained, tmp_path):
    data, model = trained
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = make_image(tmp_path / "new.png", (220, 30, 30), seed=5)
    preds = predict(model, [bad, good], min_prob=0.0)
    assert preds[0].label == "" and "not an image" in preds[0].error
    assert preds[1].label in ("blue", "green", "red") and not preds[1].error
    assert predict(model, [good], min_prob=1.0)[0].label == "unknown"


def test_predict_cli_writes_csv(trained, tmp_path, capsys):
    data, model = trained
    out = tmp_path / "p.csv"
    assert main(["--model", model, str(data / "red"), "--csv", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and sum(r["label"] == "red" for r in rows) >= 7
    assert "red" in capsys.readouterr().out


def test_predict_refuses_other_weights_and_non_models(trained, tmp_path):
    data, model = trained
    bundle = load_user(model)
    bundle["blocks"][0]["attrs"]["weights_sha256"] = "0" * 64
    other = tmp_path / "other.joblib"
    joblib.dump(bundle, other)
    with pytest.raises(UsageError, match="not the ones"):
        predict(other, [data])
    joblib.dump({"hello": 1}, tmp_path / "x.joblib")
    with pytest.raises(DataError, match="not a featurepipe model"):
        predict(tmp_path / "x.joblib", [data])
    with pytest.raises(UsageError, match="not found"):
        predict(tmp_path / "missing.joblib", [data])


def test_predict_warns_when_tensorflow_differs(trained, tmp_path):
    data, model = trained
    bundle = load_user(model)
    bundle["blocks"][0]["attrs"]["tensorflow_version"] = "1.0.0"
    old = tmp_path / "old.joblib"
    joblib.dump(bundle, old)
    with pytest.warns(UserWarning, match="TensorFlow 1.0.0"):
        predict(old, [data / "red"])


@pytest.fixture()
def finetuned(tmp_path):
    """A tiny ``.keras`` in fine-tune's format (a model of RGB 0..255 in, softmax out, and its .json)."""
    import keras

    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs / 255.0))
    path = tmp_path / "m__finetune.keras"
    keras.Model(inputs, outputs).save(path)
    path.with_suffix(".json").write_text(json.dumps({
        "class_names": ["blue", "green", "red"], "image_size": 16, "resize": "stretch"}))
    return path


def test_both_model_kinds_load_through_one_function(trained, finetuned, tmp_path):
    import keras

    data, joblib_model = trained
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    paths = [str(p) for p in sorted((data / "red").iterdir())][:3] + [str(bad)]
    for path, kind in ((joblib_model, FeaturesModel), (finetuned, FinetunedModel)):
        model = load_model(path, batch_size=2)
        assert type(model) is kind and MODEL_KINDS[Path(path).suffix] is kind
        preds = model.predict_paths(paths)
        assert [p.path for p in preds] == paths
        assert all(p.label in ("blue", "green", "red") and 0 < p.probability <= 1 for p in preds[:3])
        assert preds[3].label == "" and "not an image" in preds[3].error
    # the Keras kind reads images with featurepipe.reader, as the model's .json says
    target = Target(16, "stretch", FILE_DECODE_DEFAULT)
    images = np.stack([r.outputs[0] for r in read_images(paths[:3], [target])]).astype(np.float32)
    expected = keras.models.load_model(finetuned).predict(images, verbose=0)
    np.testing.assert_allclose([p.probability for p in preds[:3]], expected.max(1), rtol=1e-5)
    assert [p.label for p in preds[:3]] == [["blue", "green", "red"][k] for k in expected.argmax(1)]
    assert predict(finetuned, paths[:1], min_prob=1.0)[0].label == "unknown"


def test_unknown_model_suffix_is_one_line_exit_2(tmp_path, capsys):
    model = tmp_path / "m.pkl"
    model.write_text("x")
    img = make_image(tmp_path / "a.png", (20, 40, 220))
    assert run_main(main, ["--model", str(model), str(img)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model kind '.pkl'" in err and ".joblib or .keras" in err


# --------------------------------------------------------------------------- streaming (issue 27)


class _RecordingModel:
    """Stands in for a loaded model: answers every image, and before each chunk records what the
    CSV being written already holds; ``fail_at`` raises on that chunk (a predict dying midway)."""

    def __init__(self, folder, fail_at=None):
        self.folder, self.fail_at, self.chunks, self.rows_on_disk = folder, fail_at, [], []

    def predict_paths(self, paths):
        temps = list(self.folder.glob(".out.csv.tmp-*"))
        self.rows_on_disk.append(sum(1 for _ in open(temps[0])) - 1 if temps else None)
        if len(self.chunks) == self.fail_at:
            raise RuntimeError("killed")
        self.chunks.append(len(paths))
        return [Prediction(str(p), "red", 0.9) for p in paths]


def _many_images(folder, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(b"")  # never read: the stand-in model answers
    return folder


def test_predict_streams_rows_to_the_csv_chunk_by_chunk(tmp_path, monkeypatch, capsys):
    import featurepipe.predict as predictmod

    images = _many_images(tmp_path / "images", 10)
    fake = _RecordingModel(tmp_path)
    monkeypatch.setattr(predictmod, "CHUNK", 4)
    monkeypatch.setattr(predictmod, "load_model", lambda *a, **k: fake)
    bars = []

    def progress(total, show):  # the real bar switches itself off when stderr is not a terminal
        import io

        from tqdm import tqdm

        assert show
        bar = tqdm(total=total, file=io.StringIO())
        bars.append(bar)
        return bar

    monkeypatch.setattr(predictmod, "_progress", progress)
    assert main(["--model", "m.joblib", str(images), "--csv", str(tmp_path / "out.csv")]) == 0
    assert fake.chunks == [4, 4, 2]              # never more than a chunk of images in memory
    assert fake.rows_on_disk == [0, 4, 8]        # each chunk's rows are on disk before the next is read
    with open(tmp_path / "out.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 10
    assert not list(tmp_path.glob(".out.csv.tmp-*"))
    assert [(b.total, b.n) for b in bars] == [(10, 10)]  # the progress bar counted every image


def test_a_predict_that_dies_midway_leaves_no_csv_that_looks_complete(tmp_path, monkeypatch):
    import featurepipe.predict as predictmod

    images = _many_images(tmp_path / "images", 10)
    monkeypatch.setattr(predictmod, "CHUNK", 4)
    monkeypatch.setattr(predictmod, "load_model", lambda *a, **k: _RecordingModel(tmp_path, fail_at=2))
    stale = tmp_path / ".out.csv.tmp-999999999"  # left by a predict killed with kill -9
    stale.write_text("path,label\n")
    with pytest.raises(RuntimeError):
        main(["--model", "m.joblib", str(images), "--csv", str(tmp_path / "out.csv")])
    assert not (tmp_path / "out.csv").exists()
    assert not list(tmp_path.glob(".out.csv.tmp-*"))

def test_predict_csv_escapes_and_stdout_quotes_control_characters(trained, tmp_path, capsys, monkeypatch):
    import shutil

    data, model = trained
    src = sorted((data / "red").iterdir())
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(src[0], folder / "=1+2.png")
    shutil.copy(src[1], folder / "two\nlines.png")
    out = tmp_path / "p.csv"
    monkeypatch.chdir(folder)  # paths as given: the first cell of a row starts with '='
    assert main(["--model", str(model), "=1+2.png", "two\nlines.png", "--csv", str(out)]) == 0
    with open(out, newline="") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert not [c for c in cells if c.startswith("=")] and "'=1+2.png" in cells
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and any("two\\nlines.png" in line for line in lines)
    assert all(line.count("\t") == 2 for line in lines)
