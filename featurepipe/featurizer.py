"""``CNNFeatures``: a scikit-learn transformer from images to frozen-CNN features.

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.svm import LinearSVC
>>> clf = make_pipeline(CNNFeatures(backbone="mobilenet_v2", cache="feats.h5"), LinearSVC())
>>> clf.fit(train_paths, train_labels).score(test_paths, test_labels)  # doctest: +SKIP
"""

import threading
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .backbones import backbone_file_stem, get_backbone
from .settings import make_spec
from .engines import FeatureModel
from .errors import ImageError, UsageError
from .reader import DEFAULT_DECODE, file_stat, read_images, resize_array
from .store import append_cached_features, read_cached_features

# One network per (backbone, spec, engine) and process: every clone GridSearchCV makes shares it.
_MODELS = {}
_MODELS_LOCK = threading.Lock()


def shared_feature_model(entry, spec, weights, engine):
    """The FeatureModel of these settings, built once per process."""
    key = (entry.name, entry.model_path, spec, engine)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = FeatureModel(entry, spec, weights, engine=engine)
        return _MODELS[key]


class CNNFeatures(TransformerMixin, BaseEstimator):
    """Frozen-CNN features of images, as a stateless scikit-learn transformer.

    Parameters
    ----------
    backbone : str, default="mobilenet_v2"
        A registry name or ``file:PATH``.
    layer, pooling, image_size, resize, augment, weights, preprocess, decode :
        As for ``python -m featurepipe.extract`` (``decode`` applies to image files).
    batch_size : int, default=32
    engine : str, default="auto"
    cache : str or Path, optional
        A feature file (``store.py``'s layout) keyed by absolute path, file size, modification
        time and the extraction settings: features of files already in it are read instead of
        extracted, so a grid search over a pipeline does not re-extract for every fold.

    Attributes
    ----------
    spec_ : ExtractionSettings
        The resolved extraction settings (``featurepipe.settings``).
    weights_ : ResolvedWeights or None
    n_features_out_ : int or None
        Features per image: the registry's size for a backbone read at its default layer, else
        known after the first ``transform`` (or ``get_feature_names_out``).

    ``fit`` only validates and resolves the weights (no network is built); the network is built
    on the first ``transform`` and shared by every estimator with the same settings in the process.
    """

    def __init__(self, *, backbone="mobilenet_v2", layer=None, pooling="avg", image_size=None,
                 resize="stretch", augment="none", weights=None, preprocess=None, batch_size=32,
                 engine="auto", cache=None, decode=DEFAULT_DECODE):
        self.backbone = backbone
        self.layer = layer
        self.pooling = pooling
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.weights = weights
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.engine = engine
        self.cache = cache
        self.decode = decode

    def fit(self, X=None, y=None):
        """Validate the parameters and resolve the weights; no learning happens.

        Parameters
        ----------
        X, y : ignored

        Returns
        -------
        self
        """
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        entry = get_backbone(self.backbone, preprocess_mode=self.preprocess)
        self.spec_, self.weights_ = make_spec(entry, layer=self.layer, pooling=self.pooling,
                                              image_size=self.image_size, resize=self.resize,
                                              augment=self.augment, weights=self.weights,
                                              decode=self.decode)
        at_default_layer = entry.dim is not None and self.spec_.layer == (entry.layer or "")
        self.n_features_out_ = entry.dim if at_default_layer else None
        return self

    @property
    def _model(self):
        entry = get_backbone(self.backbone, preprocess_mode=self.preprocess)
        return shared_feature_model(entry, self.spec_, self.weights_, self.engine)

    def _features(self, images):
        features = self._model(images)
        self.n_features_out_ = features.shape[1]
        return features

    def transform(self, X):
        """Features of images.

        Parameters
        ----------
        X : list of str/Path of shape (n_samples,), or ndarray of shape (n_samples, H, W, 3)
            Image files, or RGB images with values 0..255 (resized as ``resize`` says).

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_), float32
        """
        check_is_fitted(self, "spec_")
        if isinstance(X, np.ndarray) and X.ndim == 4:
            return self._from_arrays(X)
        paths = [str(Path(p).resolve()) for p in (X.ravel() if isinstance(X, np.ndarray) else X)]
        if self.cache is None:
            return self._from_files(paths)
        return self._cached(paths)

    def get_feature_names_out(self, input_features=None):
        """Names of the output features.

        Parameters
        ----------
        input_features : ignored

        Returns
        -------
        ndarray of str of shape (n_features_out_,)
            ``<backbone>_0`` ... ``<backbone>_{D-1}``.
        """
        check_is_fitted(self, "spec_")
        if self.n_features_out_ is None:
            self.n_features_out_ = self._model.dim
        stem = backbone_file_stem(self.backbone)
        return np.array([f"{stem}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def _from_arrays(self, images):
        if images.shape[-1] != 3:
            raise UsageError(f"images must have shape (n, H, W, 3), got {images.shape}")
        size = self.spec_.image_size
        out = []
        for start in range(0, len(images), int(self.batch_size)):
            # Rounded as the engine rounds other dtypes (not truncated).
            batch = np.clip(np.rint(np.asarray(images[start:start + int(self.batch_size)])), 0, 255).astype(np.uint8)
            batch = np.stack([resize_array(im, size, self.resize) for im in batch])
            out.append(self._features(batch))
        return np.concatenate(out) if out else np.zeros((0, self.n_features_out_ or 0), np.float32)

    def _from_files(self, paths):
        target = self.spec_.target()
        batch_size = int(self.batch_size)
        out, batch = [], []
        for path, item in zip(paths, read_images(paths, [target])):
            if isinstance(item, ImageError):
                raise ImageError(f"{path}: {item}")
            batch.append(item.outputs[0])
            if len(batch) == batch_size:
                out.append(self._features(np.stack(batch)))
                batch = []
        if batch:
            out.append(self._features(np.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.n_features_out_ or 0), np.float32)

    def _cached(self, paths):
        settings = self.spec_.identity()
        known = read_cached_features(self.cache, settings)
        keys = [_stat_key(p) for p in paths]
        missing = sorted(set(keys) - set(known))
        if missing:
            new = self._from_files([k[0] for k in missing])
            known.update(zip(missing, new))
            append_cached_features(self.cache, settings, dict(zip(missing, new)))
        return np.stack([known[k] for k in keys]) if keys else self._from_files([])


def _stat_key(path):
    """(path, size, mtime_ns); a missing file gets -1s (reading it then names the problem)."""
    try:
        return (path, *file_stat(path))
    except OSError:
        return (path, -1, -1)
