import csv
import sys
import types

import joblib
import pytest

from featurepipe.errors import DataError, UsageError
from featurepipe.extract import extract
from featurepipe.fit import fit
from featurepipe.predict import Prediction, main, predict

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
    bundle = joblib.load(model)
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
    bundle = joblib.load(model)
    bundle["blocks"][0]["attrs"]["tensorflow_version"] = "1.0.0"
    old = tmp_path / "old.joblib"
    joblib.dump(bundle, old)
    with pytest.warns(UserWarning, match="TensorFlow 1.0.0"):
        predict(old, [data / "red"])


def test_keras_models_go_to_the_finetune_stage(monkeypatch, tmp_path):
    seen = []

    def predict_images(model_path, image_paths, *, batch_size=32):
        seen.append((str(model_path), list(image_paths)))
        return [(image_paths[0], "x", 0.9), (image_paths[1], None, "cannot decode")]

    monkeypatch.setitem(sys.modules, "featurepipe.finetune", types.SimpleNamespace(predict_images=predict_images))
    img = make_image(tmp_path / "a.png", (20, 40, 220))
    bad = tmp_path / "b.jpg"
    bad.write_text("x")
    preds = predict(tmp_path / "m.keras", [img, bad], min_prob=0.5)
    assert preds == [Prediction(str(img), "x", 0.9), Prediction(str(bad), "", preds[1].probability, "cannot decode")]
    assert seen == [(str(tmp_path / "m.keras"), [str(img), str(bad)])]
    assert predict(tmp_path / "m.keras", [img, bad], min_prob=0.95)[0].label == "unknown"
