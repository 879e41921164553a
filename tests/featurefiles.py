"""Synthetic, contract-shaped feature files for the classifier tests."""

from pathlib import Path

import numpy as np

from featurepipe.store import FeatureFileWriter

CLASSES = ["a", "b", "c"]


def separable(n_per_class=16, dim=12, seed=0, classes=CLASSES, test_every=4):
    """Rows of well separated Gaussian clusters: (X, y, paths, split), paths sorted."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (len(classes), dim)) * 4
    X, y, paths, split = [], [], [], []
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            X.append(centers[c] + rng.normal(0, 1, dim))
            y.append(c)
            paths.append(f"{name}/img_{i:03d}.jpg")
            split.append("test" if i % test_every == 0 else "train")
    order = np.argsort(paths)
    X = np.abs(np.array(X, dtype=np.float32))[order]  # non-negative, like pooled ReLU features
    return X, np.array(y)[order], [paths[i] for i in order], [split[i] for i in order]


def write_features(path, X, y, paths, split, *, class_names=CLASSES, backbone="synthetic"):
    """Write a feature file following the HDF5 contract; rows in the order given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"backbone": backbone, "layer": "", "pooling": "avg", "image_size": 32, "resize": "stretch",
             "preprocess": "scale", "augment": "none", "weights_sha256": "", "feature_dim": X.shape[1],
             "tensorflow_version": "0"}
    w = FeatureFileWriter(path, n_rows=len(paths), dim=X.shape[1], class_names=class_names, attrs=attrs)
    n = len(paths)
    w.write_rows(np.arange(n), features=X, labels=y, paths=paths, split=split,
                 file_size=np.zeros(n, np.int64), mtime_ns=np.zeros(n, np.int64), sha1=["0" * 40] * n)
    w.write_skipped([])
    w.commit()
    return path


def two_files(root, *, dim=(12, 8)):
    """Two feature files of one dataset ``root/synth`` (the second in reversed row order)."""
    X, y, paths, split = separable(dim=dim[0])
    a = write_features(Path(root) / "synth" / "alpha.h5", X, y, paths, split)
    X2, _, _, _ = separable(dim=dim[1], seed=1)
    rev = slice(None, None, -1)
    b = write_features(Path(root) / "synth" / "beta.h5", X2[rev], y[rev], paths[rev], split[rev])
    return a, b
