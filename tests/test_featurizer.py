import os
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import (check_get_params_invariance, check_no_attributes_set_in_init,
                                            check_parameters_default_constructible, check_set_params)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from featurepipe import engines, featurizer
from featurepipe.errors import ImageError, UsageError
from featurepipe.extract import extract
from featurepipe.featurizer import CNNFeatures
from featurepipe.images import list_images
from featurepipe.store import CACHE_SPLIT, load


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
    assert sum(calls) == len(paths)  # fit runs no forward pass; every image extracted once


def test_bad_image_in_transform_names_the_file(tiny_data, tiny_model_path):
    bad = tiny_data / "red" / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageError, match="bad.jpg"):
        _featurizer(tiny_model_path).fit().transform([bad])


@pytest.mark.parametrize("check", [check_get_params_invariance, check_set_params,
                                   check_no_attributes_set_in_init, check_parameters_default_constructible])
def test_scikit_learn_estimator_checks(check):
    check("CNNFeatures", CNNFeatures())


def test_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        CNNFeatures("mobilenet_v2")


def test_unfitted_transform_raises_not_fitted(tiny_model_path):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(NotFittedError):
        _featurizer(tiny_model_path).transform(images)
    with pytest.raises(NotFittedError):
        _featurizer(tiny_model_path).get_feature_names_out()


def test_fit_builds_no_network_and_takes_the_size_from_the_registry(monkeypatch):
    built = []
    monkeypatch.setattr(featurizer, "FeatureModel", lambda *a, **k: built.append(a))
    est = CNNFeatures(backbone="mobilenet_v2", weights="none").fit()
    assert est.n_features_out_ == 1280 and built == []
    assert est.get_feature_names_out().shape == (1280,) and built == []


def test_fit_validates_what_init_stored(tiny_model_path):
    est = _featurizer(tiny_model_path, batch_size=0)
    assert est.batch_size == 0  # stored as given
    with pytest.raises(UsageError, match="batch_size"):
        est.fit()
    with pytest.raises(UsageError, match="resize"):
        _featurizer(tiny_model_path, resize="bogus").fit()


def test_other_layer_size_known_after_first_transform(tiny_model_path):
    est = _featurizer(tiny_model_path).fit()
    assert est.n_features_out_ is None  # a file: model has no registry size
    out = est.transform(np.zeros((2, 32, 32, 3), np.uint8))
    assert est.n_features_out_ == out.shape[1] == 16


def test_clones_share_one_network(tiny_model_path, monkeypatch):
    monkeypatch.setattr(featurizer, "_MODELS", {})
    built = []
    real = featurizer.FeatureModel
    monkeypatch.setattr(featurizer, "FeatureModel", lambda *a, **k: built.append(a) or real(*a, **k))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    est = _featurizer(tiny_model_path)
    for copy in (est, clone(est), clone(est), pickle.loads(pickle.dumps(clone(est).fit()))):
        copy.fit().transform(images)
    assert len(built) == 1
    _featurizer(tiny_model_path, pooling="max").fit().transform(images)
    assert len(built) == 2  # other settings, another network


def test_cache_is_a_feature_file_keyed_by_settings_and_stat(tiny_data, tiny_model_path, tmp_path, monkeypatch):
    paths = [str(p) for p in sorted((tiny_data / "red").glob("*"))][:3]
    cache = tmp_path / "c" / "cache.h5"
    calls = []
    real = engines.FeatureModel.__call__
    monkeypatch.setattr(engines.FeatureModel, "__call__", lambda self, x: calls.append(len(x)) or real(self, x))
    first = _featurizer(tiny_model_path, cache=cache).fit().transform(paths)
    f = load(cache)
    assert sorted(f.paths) == sorted(paths) and set(f.split) == {CACHE_SPLIT} and f.X.shape == (3, 16)
    assert f.attrs["pooling"] == "avg"
    np.testing.assert_array_equal(_featurizer(tiny_model_path, cache=cache).fit().transform(paths[::-1]), first[::-1])
    assert sum(calls) == 3  # the second call read the cache
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file is extracted again
    _featurizer(tiny_model_path, cache=cache).fit().transform(paths)
    assert sum(calls) == 4
    _featurizer(tiny_model_path, cache=cache, pooling="max").fit().transform(paths)
    assert sum(calls) == 7 and load(cache).attrs["pooling"] == "max"  # other settings: extracted


def _bytes_written():
    """Bytes this process has passed to write calls so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


def test_the_cache_appends_each_batch_instead_of_rewriting_the_file(tmp_path):
    from featurepipe.store import append_cached_features, read_cached_features

    cache, settings, dim, per_batch = tmp_path / "cache.h5", {"backbone": "x", "pooling": "avg"}, 512, 200
    rng = np.random.default_rng(0)
    written, expected = [], {}
    for batch in range(10):
        rows = {(f"/img/{batch}_{i}.jpg", 1000 + i, 7): rng.normal(size=dim).astype(np.float32)
                for i in range(per_batch)}
        expected.update(rows)
        before = _bytes_written()
        append_cached_features(cache, settings, rows)
        written.append(_bytes_written() - before)
    one_batch = per_batch * dim * 4
    # Rewriting the file would cost k batches at the k-th batch (55 batches' bytes for the ten);
    # appending costs one batch each time (HDF5 writes whole chunks, so a little more), flat.
    assert max(written[5:]) < 1.5 * max(written[1:5]), written
    assert sum(written) < 55 * one_batch / 2, written
    read = read_cached_features(cache, settings)
    assert read.keys() == expected.keys()
    assert all(np.array_equal(read[k], v) for k, v in expected.items())


def test_an_interrupted_append_is_ignored_and_overwritten(tmp_path):
    import h5py

    from featurepipe.store import CACHE_ROWS, append_cached_features, read_cached_features

    cache, settings = tmp_path / "cache.h5", {"backbone": "x"}
    append_cached_features(cache, settings, {("/a.jpg", 1, 1): np.ones(4, np.float32)})
    with h5py.File(cache, "r+") as f:  # what a writer killed after resizing leaves
        for name in ("features", "paths", "labels", "split", "file_size", "mtime_ns", "sha1"):
            f[name].resize((3, *f[name].shape[1:]))
        f["paths"][1:] = ["/half.jpg", "/half2.jpg"]
        assert f.attrs[CACHE_ROWS] == 1
    assert list(read_cached_features(cache, settings)) == [("/a.jpg", 1, 1)]
    append_cached_features(cache, settings, {("/b.jpg", 2, 2): np.full(4, 2, np.float32)})
    assert sorted(read_cached_features(cache, settings)) == [("/a.jpg", 1, 1), ("/b.jpg", 2, 2)]
    assert read_cached_features(cache, {"backbone": "other"}) == {}


def test_transformer_batches_accumulate_in_the_cache(tiny_data, tiny_model_path, tmp_path):
    paths = sorted(str(p) for p in tiny_data.rglob("*.png"))
    cache = tmp_path / "cache.h5"
    features = _featurizer(tiny_model_path, cache=cache).fit()
    for start in range(0, len(paths), 6):
        features.transform(paths[start:start + 6])
    assert sorted(load(cache).paths) == paths
    np.testing.assert_allclose(features.transform(paths), _featurizer(tiny_model_path).fit().transform(paths),
                               rtol=1e-6)
