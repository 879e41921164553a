"""featurepipe export: every head as graph ops equals scikit-learn; exported files equal predict.

Two tiny random-weight backbones with different input sizes (32 and 40: the shared input is resized
inside the graph) stand in for real networks, so this runs without ../shared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurepipe.cli import run_main
from featurepipe.errors import UsageError
from featurepipe.export import FORMATS, MANIFEST, check, export, main
from featurepipe.heads import head_function

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["logreg", "svm", "svm-rbf", "mlp", "nb", "knn"]
# svm-rbf above FEATUREPIPE_EXACT_RBF_MAX_ROWS training rows: ScaledNystroem + RidgeClassifier, calibrated
NYSTROEM = "svm-rbf-nystroem"


def _tiny_backbone(path, size, seed):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(12, 3, activation="relu")(x)
    keras.Model(inputs, x).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny images, features from two tiny backbones (32 and 40 px), and a fit(clf) -> model path."""
    from featurepipe.extract import extract
    from featurepipe.fit import fit

    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "colors", n_per_class=10)
    nets = [_tiny_backbone(root / "net32.keras", 32, 1), _tiny_backbone(root / "net40.keras", 40, 2)]
    # its own cache too: a module fixture is made before conftest's per-test FEATUREPIPE_CACHE
    env = {"FEATUREPIPE_DATA": str(root / "data"), "FEATUREPIPE_MODELS": str(root / "models"),
           "FEATUREPIPE_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        files = [r.path for r in extract(data, [f"file:{n}" for n in nets], preprocess="scale", quiet=True,
                                         test_size=0.3)]
    models = {}

    def model(clf):
        if clf not in models:
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                if clf == NYSTROEM:  # its own models folder: the file name is the exact svm-rbf's
                    mp.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "5")
                    mp.setenv("FEATUREPIPE_MODELS", str(root / "models-nystroem"))
                models[clf] = Path(fit(files, "svm-rbf" if clf == NYSTROEM else clf, cv=3, n_jobs=1).model)
        return models[clf]

    exports = {}

    def exported(clf):
        """The TFLite export of ``clf``'s model with the default options (made once)."""
        if clf not in exports:
            exports[clf] = export(model(clf), out=root / f"out-{clf}", quiet=True)
        return exports[clf]

    return {"data": data, "root": root, "model": model, "exported": exported, "files": files, "env": env}


# --------------------------------------------------------------------------- heads alone


def _fitted(clf, n_classes, monkeypatch, *, n=90):
    """``clf`` from the registry fitted as fit does (calibrated when it has no predict_proba) on
    tiny learnable data; the held-out rows (25, 12)."""
    from featurepipe.classifiers import CLASSIFIERS, calibrated, needs_calibration

    if clf == NYSTROEM:
        monkeypatch.setenv("FEATUREPIPE_EXACT_RBF_MAX_ROWS", "10")
    rng = np.random.default_rng(n_classes)
    X = rng.normal(size=(n, 12)).astype(np.float32)
    y = np.arange(n) % n_classes
    X[np.arange(n), y] += 2.0  # learnable
    test = rng.normal(size=(25, 12)).astype(np.float32)
    model = CLASSIFIERS["svm-rbf" if clf == NYSTROEM else clf].make(n_samples=n, n_features=12)
    model = calibrated(model, cv=3) if needs_calibration(model) else model
    return model.fit(X, y), test


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("clf", HEADS + [NYSTROEM])
def test_every_head_as_graph_ops_equals_scikit_learn(clf, n_classes, monkeypatch):
    model, test = _fitted(clf, n_classes, monkeypatch)
    fn, output = head_function(model)
    got = np.asarray(fn(test))
    assert output == "probabilities"
    assert got.shape == (25, n_classes)
    np.testing.assert_allclose(got, model.predict_proba(test), atol=1e-5)


def test_the_size_aware_estimators_are_the_ones_exported(monkeypatch):
    """The heads above are the merged registry's: Nystroem + ridge (calibrated) and faiss kNN."""
    from sklearn.linear_model import RidgeClassifier

    from featurepipe.estimators import FaissKNN, ScaledNystroem

    nystroem, _ = _fitted(NYSTROEM, 4, monkeypatch)
    pipeline = nystroem.calibrated_classifiers_[0].estimator
    assert isinstance(pipeline.named_steps["kernel"], ScaledNystroem)
    assert isinstance(pipeline.named_steps["clf"], RidgeClassifier)
    knn, _ = _fitted("knn", 4, monkeypatch)
    assert isinstance(knn.named_steps["clf"], FaissKNN)


def test_an_ivf_faiss_knn_is_refused_naming_why():
    from featurepipe.estimators import FaissKNN
    from featurepipe.heads import NotExportable

    rng = np.random.default_rng(0)
    knn = FaissKNN(n_neighbors=3, exact_max_rows=10).fit(rng.normal(size=(400, 8)), np.arange(400) % 2)
    with pytest.raises(NotExportable, match="FaissKNN over a IndexIVFScalarQuantizer of 400 rows .*approximate"):
        head_function(knn)


def test_a_head_without_a_graph_is_refused_naming_the_formats(world, capsys):
    model = world["model"]("sklearn.tree:DecisionTreeClassifier")
    with pytest.raises(UsageError, match="no format featurepipe writes .*tflite, savedmodel"):
        export(model, out=world["root"] / "rf-out", quiet=True)
    assert run_main(main, ["--model", str(model), "--out", str(world["root"] / "rf-out")]) == 2
    assert "cannot export 'sklearn.tree:DecisionTreeClassifier': DecisionTreeClassifier" in capsys.readouterr().err


# --------------------------------------------------------------------------- exported files


@pytest.mark.parametrize("clf", HEADS + [NYSTROEM])
def test_the_exported_tflite_equals_featurepipe_on_the_test_images(world, clf):
    result = world["exported"](clf)
    parity = result.manifest["parity"]
    assert result.path.suffix == ".tflite" and result.path.is_file()
    assert parity["images"] == 9 and parity["unreadable"] == 0
    assert parity["a_same_pixels"]["top1_equal"] == 1.0
    assert parity["a_same_pixels"]["max_abs_diff"] <= 1e-4
    assert parity["b_from_files"]["top1_agreement"] >= 0.99
    assert parity["passed"] and result.passed
    on_disk = json.loads(result.manifest_path.read_text())
    assert on_disk["parity"] == parity
    assert on_disk["classes"] == ["blue", "green", "red"]
    assert (result.path.parent / "labels.txt").read_text().split() == ["blue", "green", "red"]


def test_the_manifest_describes_input_backbones_head_and_versions(world):
    m = world["exported"]("logreg").manifest
    # two input sizes: the shared input is three times the largest, both resized inside the graph
    assert m["input"]["size"] == 120 and m["input"]["dtype"] == "uint8" and m["input"]["resize"] == "stretch"
    assert sorted(m["input"]["resize_inside"].values()) == [32, 40]
    assert [b["image_size"] for b in m["backbones"]] == [32, 40]
    assert all(len(b["weights_sha256"]) == 64 and b["preprocess"] == "scale" for b in m["backbones"])
    assert m["head"]["clf"] == "logreg" and "LogisticRegression" in m["head"]["estimator"]
    assert m["outputs"]["kind"] == "probabilities" and m["outputs"]["shape"] == [None, 3]
    assert {"featurepipe", "tensorflow", "scikit-learn"} <= set(m["versions"])


def test_savedmodel_export_passes_the_same_check(world):
    result = export(world["model"]("svm"), fmt="savedmodel", out=world["root"] / "out-sm", quiet=True)
    assert (result.path / "saved_model.pb").is_file()
    assert result.manifest["parity"]["a_same_pixels"]["max_abs_diff"] <= 1e-4 and result.passed


def test_check_runs_again_and_catches_a_file_that_is_not_the_model(world, tmp_path):
    import shutil

    good = world["exported"]("mlp")
    copy = tmp_path / "copy"
    shutil.copytree(good.path.parent, copy)
    checked = copy / good.path.name
    assert run_main(main, ["--check", str(checked), "--quiet"]) == 0
    # Another model's file under this name: the check sees the probabilities differ.
    checked.write_bytes(world["exported"]("nb").path.read_bytes())
    redone = check(checked, quiet=True)
    assert not redone.passed
    assert redone.manifest["parity"]["a_same_pixels"]["max_abs_diff"] > 1e-4
    assert run_main(main, ["--check", str(checked), "--quiet"]) == 1


def test_the_default_model_is_the_best_row_loaded_only_when_its_sha256_matches(world, monkeypatch, tmp_path, capsys):
    from featurepipe.fit import fit
    from featurepipe.modelfile import ModelRefused

    for k, v in {**world["env"], "FEATUREPIPE_MODELS": str(tmp_path / "models")}.items():
        monkeypatch.setenv(k, v)
    best = Path(fit(world["files"], "logreg", cv=3, n_jobs=1).model)  # the only row: the best by CV
    result = export(out=tmp_path / "out", limit=3, quiet=True)
    assert result.manifest["source_model"]["path"] == str(best.resolve()) and best.suffix == ".skops"
    assert result.passed
    best.write_bytes(best.read_bytes() + b" ")  # replaced after fit: neither export nor --check reads it
    with pytest.raises(ModelRefused, match="sha256"):
        export(out=tmp_path / "again", quiet=True)
    assert run_main(main, ["--out", str(tmp_path / "again")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert run_main(main, ["--check", str(result.path), "--quiet"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_an_older_joblib_is_exported_as_the_users_choice(world, tmp_path, capsys):
    import joblib

    from featurepipe.modelfile import load_user

    old = tmp_path / "old__logreg.joblib"
    joblib.dump(load_user(world["model"]("logreg")), old)
    result = export(old, out=tmp_path / "out", limit=3, quiet=True)
    assert result.passed and result.manifest["source_model"]["path"] == str(old.resolve())
    # --check never unpickles what a manifest names: the user names the file again
    assert run_main(main, ["--check", str(result.path), "--quiet"]) == 2
    assert "pass it with --model" in capsys.readouterr().err
    assert run_main(main, ["--check", str(result.path), "--model", str(old), "--quiet"]) == 0


def test_wrong_arguments_are_one_line(world, capsys):
    model = str(world["model"]("logreg"))
    assert run_main(main, ["--model", model, "--format", "coreml"]) == 2
    assert "unknown --format 'coreml'" in capsys.readouterr().err
    assert run_main(main, ["--model", model, "--format", "savedmodel", "--quantize", "float16"]) == 2
    assert "--quantize float16" in capsys.readouterr().err
    assert run_main(main, ["--model", model, "--out", str(world["data"] / "red" / "x")]) == 2
    assert "inside the image folder" in capsys.readouterr().err
    assert not (world["data"] / "red" / "x").exists()
    assert run_main(main, ["--check", str(world["root"] / "nothing.tflite")]) == 2
    a_file = world["root"] / "a-file"
    a_file.write_text("x")
    assert run_main(main, ["--model", model, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_float16_export_reports_its_accuracy_change(world):
    result = export(world["model"]("logreg"), out=world["root"] / "out-f16", quantize="float16", quiet=True)
    parity = result.manifest["parity"]
    assert result.manifest["quantize"] == "float16"
    assert parity["a_same_pixels"]["bound"] is None  # no 1e-4 bound for a quantized file
    assert parity["accuracy_ok"] and abs(parity["accuracy_change"]) <= 0.01
    assert parity["a_same_pixels"]["max_abs_diff"] < 0.05


# --------------------------------------------------------------------------- outside featurepipe

BLOCKER = """
import runpy, sys
BLOCKED = ("tensorflow", "keras", "featurepipe", "sklearn", "h5py", "jax", "torch")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the example must run without it")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_example_labels_images_without_tensorflow_or_featurepipe(world, tmp_path):
    from featurepipe.predict import predict

    result = world["exported"]("svm-rbf")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out_csv = tmp_path / "labels.csv"
    done = subprocess.run([sys.executable, "-c", BLOCKER, str(ROOT / "examples" / "classify_tflite.py"),
                           str(result.path), str(world["data"]), "--csv", str(out_csv)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    theirs = {row.split("\t")[0]: row.split("\t")[1] for row in done.stdout.splitlines()}
    ours = {p.path: p.label for p in predict(result.manifest["source_model"]["path"], [world["data"]])}
    assert len(theirs) == len(ours) == 30
    assert sum(theirs[p] == ours[p] for p in ours) / len(ours) >= 0.99
    assert out_csv.read_text().count("\n") == 31


def _python_with(module, env_var):
    """A Python that imports ``module``: this one, or the one ``env_var`` names (None if neither)."""
    for python in (sys.executable, os.environ.get(env_var)):
        if python and subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                                     env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).returncode == 0:
            return python
    return None


MEDIAPIPE_CLIENT = """
import json, sys
import mediapipe as mp
from mediapipe.tasks import python as mp_python
from mediapipe.tasks.python import vision
options = vision.ImageClassifierOptions(base_options=mp_python.BaseOptions(model_asset_path=sys.argv[1]),
                                        max_results=1)
with vision.ImageClassifier.create_from_options(options) as classifier:
    for path in sys.argv[2:]:
        top = classifier.classify(mp.Image.create_from_file(path)).classifications[0].categories[0]
        print(json.dumps([path, top.category_name]))
"""


def test_mediapipe_image_classifier_loads_the_file_with_its_class_names(world, monkeypatch, tmp_path):
    """A real client that is not ours: MediaPipe's ImageClassifier reads the labels from the metadata."""
    client = _python_with("mediapipe.tasks.python.vision", "FEATUREPIPE_MEDIAPIPE_PYTHON")
    if client is None:
        pytest.skip("MediaPipe is not installed here nor named by FEATUREPIPE_MEDIAPIPE_PYTHON "
                    "(pip install mediapipe in a separate venv; see docs/export.md)")
    writer = _python_with("mediapipe.tasks.python.metadata.metadata_writers.image_classifier",
                          "FEATUREPIPE_METADATA_PYTHON")
    if writer is None:
        pytest.skip("no TFLite metadata writer: mediapipe==0.10.21 is not installed here nor named by "
                    "FEATUREPIPE_METADATA_PYTHON (see docs/export.md)")
    if writer != sys.executable:
        monkeypatch.setenv("FEATUREPIPE_METADATA_PYTHON", writer)
    from featurepipe.predict import predict

    result = export(world["model"]("logreg"), out=world["root"] / "out-mediapipe", quiet=True)
    assert result.manifest["metadata"]["embedded"]
    images = sorted(str(p) for p in world["data"].rglob("*.png"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([client, "-c", MEDIAPIPE_CLIENT, str(result.path), *images], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    theirs = dict(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
    ours = {p.path: p.label for p in predict(result.manifest["source_model"]["path"], images)}
    assert len(theirs) == 30
    assert sum(theirs[p] == ours[p] for p in ours) / len(ours) >= 0.95


def test_the_input_is_the_one_size_or_three_times_the_largest():
    from featurepipe.export import input_size

    assert input_size([224]) == input_size([224, 224]) == 224
    assert input_size([227, 224, 260]) == 780


def test_every_format_has_a_writer_and_a_runtime():
    assert set(FORMATS) == {"tflite", "savedmodel"}
    assert all(callable(f.write) and callable(f.runner) and f.runtime for f in FORMATS.values())
    assert MANIFEST == "manifest.json"
