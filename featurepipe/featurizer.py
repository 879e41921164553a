"""``CNNFeatures``: a scikit-learn transformer from images to frozen-CNN features.

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.svm import LinearSVC
>>> clf = make_pipeline(CNNFeatures(backbone="mobilenet_v2", cache="feats.h5"), LinearSVC())
>>> clf.fit(train_paths, train_labels).score(test_paths, test_labels)  # doctest: +SKIP
"""

import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .backbones import get_backbone, make_spec
from .engines import FeatureModel
from .errors import ImageError, UsageError
from .reader import DEFAULT_DECODE, RESIZE_MODES, Target, check_decode, file_stat, read_images, resize_array


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
        An HDF5 file keyed by absolute path (with file size and modification time): features of
        files already in it are read instead of extracted, so a grid search over a pipeline does
        not re-extract for every fold.

    Attributes
    ----------
    n_features_out_ : int
    spec_ : FeatureSpec
    """

    def __init__(self, backbone="mobilenet_v2", *, layer=None, pooling="avg", image_size=None,
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
        """Validate the parameters and resolve the weights; no learning happens."""
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if int(self.batch_size) < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size!r}")
        check_decode(self.decode)
        entry = get_backbone(self.backbone, preprocess_mode=self.preprocess)
        self.spec_, self.weights_ = make_spec(entry, layer=self.layer, pooling=self.pooling,
                                              image_size=self.image_size, resize=self.resize,
                                              augment=self.augment, weights=self.weights)
        self.n_features_out_ = self._model.dim
        return self

    @property
    def _model(self):
        """The network, built on first use (and again after unpickling)."""
        if getattr(self, "_model_cache", None) is None:
            entry = get_backbone(self.backbone, preprocess_mode=self.preprocess)
            self._model_cache = FeatureModel(entry, self.spec_, self.weights_, engine=self.engine)
        return self._model_cache

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_model_cache", None)
        return state

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
        if not hasattr(self, "spec_"):
            self.fit()
        if isinstance(X, np.ndarray) and X.ndim == 4:
            return self._from_arrays(X)
        paths = [str(Path(p).resolve()) for p in (X.ravel() if isinstance(X, np.ndarray) else X)]
        if self.cache is None:
            return self._from_files(paths)
        return self._cached(paths)

    def get_feature_names_out(self, input_features=None):
        """``<backbone>_0`` ... ``<backbone>_{D-1}``."""
        from .backbones import backbone_file_stem

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
            out.append(self._model(batch))
        return np.concatenate(out) if out else np.zeros((0, self.n_features_out_), np.float32)

    def _from_files(self, paths):
        target = Target(self.spec_.image_size, self.spec_.resize, self.decode)
        batch_size = int(self.batch_size)
        out, batch = [], []
        for path, item in zip(paths, read_images(paths, [target])):
            if isinstance(item, ImageError):
                raise ImageError(f"{path}: {item}")
            batch.append(item.outputs[0])
            if len(batch) == batch_size:
                out.append(self._model(np.stack(batch)))
                batch = []
        if batch:
            out.append(self._model(np.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.n_features_out_), np.float32)

    def _cached(self, paths):
        import h5py

        from .store import STR

        identity = {**self.spec_.identity(), "decode": self.decode}
        key = "/".join(f"{k}={v}" for k, v in sorted(identity.items())).replace("/", "|")
        keys = [f"{p}|{'|'.join(map(str, file_stat(p)))}" if os.path.exists(p) else p for p in paths]
        Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.cache, "a") as f:
            group = f.require_group(key)
            known = {}
            if "keys" in group:
                known = {k: i for i, k in enumerate(group["keys"].asstr()[()])}
            missing = sorted({k for k in keys if k not in known})
            if missing:
                where = {k: p for k, p in zip(keys, paths)}
                new = self._from_files([where[k] for k in missing])
                if "keys" not in group:
                    group.create_dataset("keys", shape=(0,), maxshape=(None,), dtype=STR)
                    group.create_dataset("features", shape=(0, new.shape[1]), maxshape=(None, new.shape[1]),
                                         dtype="f4", chunks=True)
                n = group["keys"].shape[0]
                group["keys"].resize((n + len(missing),))
                group["features"].resize((n + len(missing), new.shape[1]))
                group["keys"][n:] = np.array(missing, dtype=object)
                group["features"][n:] = new
                known.update({k: n + i for i, k in enumerate(missing)})
            unique_rows, inverse = np.unique([known[k] for k in keys], return_inverse=True)
            return group["features"][unique_rows][inverse]
