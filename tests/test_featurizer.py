import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from featurepipe import engines
from featurepipe.errors import ImageError
from featurepipe.extract import extract
from featurepipe.featurizer import CNNFeatures
from featurepipe.images import list_images
from featurepipe.store import load


def _featurizer(model_path, **kw):
    return CNNFeatures(backbone=f"file:{model_path}", preprocess="scale", **kw)


def test_transform_paths_equals_the_extracted_file(tiny_data, tiny_model_path, tmp_path):
    [result] = extract(tiny_data, [f"file:{tiny_model_path}"], out=tmp_path / "o", preprocess="scale", quiet=True)
    f = load(result.path)
    features = _featurizer(tiny_model_path).fit().transform([tiny_data / p for p in f.paths])
    assert features.shape == (18, 16) and features.dtype == np.float32
    np.testing.assert_allclose(features, f.X, rtol=1e-5, atol=1e-6)


def test_params_stored_as_given_and_clone_and_pickle(tiny_model_path):
    est = _featurizer(tiny_model_path, pooling="max", batch_size=4)
    assert est.get_params()["pooling"] == "max" and est.get_params()["batch_size"] == 4
    assert clone(est).get_params() == est.get_params()
    est.fit()
    restored = pickle.loads(pickle.dumps(est))
    images = np.random.default_rng(0).integers(0, 255, (3, 40, 50, 3)).astype(np.uint8)
    np.testing.assert_allclose(restored.transform(images), est.transform(images), rtol=1e-6)
    assert list(est.get_feature_names_out()[:2]) == ["tiny_0", "tiny_1"]


def test_array_input_is_resized_and_not_modified(tiny_model_path):
    images = np.random.default_rng(1).integers(0, 255, (5, 64, 48, 3)).astype(np.uint8)
    before = images.copy()
    out = _featurizer(tiny_model_path, batch_size=2).fit().transform(images)
    assert out.shape == (5, 16)
    np.testing.assert_array_equal(images, before)


def test_pipeline_grid_search_with_cache_extracts_each_image_once(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    index = list_images(tiny_data)
    paths = [str(tiny_data / p) for p in index.paths]
    calls = []
    real = engines.FeatureModel.__call__
    monkeypatch.setattr(engines.FeatureModel, "__call__", lambda self, x: calls.append(len(x)) or real(self, x))
    pipe = make_pipeline(_featurizer(tiny_model_path, cache=tmp_path / "cache.h5"), LogisticRegression(max_iter=500))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 10.0]}, cv=3).fit(paths, index.labels)
    assert search.best_score_ >= 0.9
    n_extracted = sum(calls) - calls.count(1)  # the dimension probe runs one blank image
    assert n_extracted == len(paths)


def test_bad_image_in_transform_names_the_file(tiny_data, tiny_model_path):
    bad = tiny_data / "red" / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageError, match="bad.jpg"):
        _featurizer(tiny_model_path).fit().transform([bad])
