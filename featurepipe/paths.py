"""Where featurepipe keeps things: the one place that knows its folders.

Environment variables come first, then defaults relative to the working directory:

* ``data_home()``     ``$FEATUREPIPE_DATA`` or ``./data``: datasets and ``features/``
* ``models_home()``   ``$FEATUREPIPE_MODELS`` or ``./models``: ``<dataset>/`` per feature folder
* ``cache_dir()``     ``$FEATUREPIPE_CACHE`` or ``~/.cache/featurepipe``: converted models, engine choices
* ``latest_pointer()`` ``data_home()/features/latest.json``: the feature files of the last extract run

This module imports nothing else from featurepipe, so every module may use it.
"""

import os
from pathlib import Path

SOURCE_MARKER = ".featurepipe-source.json"  # in models/<dataset>/: the feature folder it belongs to


def data_home():
    """The folder for datasets and feature files (``$FEATUREPIPE_DATA`` or ``./data``)."""
    return Path(os.environ.get("FEATUREPIPE_DATA") or "data")


def models_home():
    """The models root (``$FEATUREPIPE_MODELS`` or ``./models``)."""
    return Path(os.environ.get("FEATUREPIPE_MODELS") or "models")


def cache_dir():
    """Converted models and engine choices (``$FEATUREPIPE_CACHE`` or ``~/.cache/featurepipe``)."""
    return Path(os.environ.get("FEATUREPIPE_CACHE") or Path.home() / ".cache" / "featurepipe")


def features_home():
    """``data_home()/features``: the default parent of every output folder."""
    return data_home() / "features"


def latest_pointer():
    """The file naming the feature files of the most recent extract run."""
    return features_home() / "latest.json"


def default_out_dir(data):
    """``data/features/<name of the data folder, or the CSV's stem>``."""
    data = Path(data)
    name = data.stem if data.is_file() else data.resolve().name
    return features_home() / name


def dataset_name(feature_file):
    """The dataset a feature file belongs to: its folder's name (``data/features/<dataset>/x.h5``)."""
    return Path(feature_file).resolve().parent.name


def models_dir(dataset):
    """``models/<dataset>/`` (not created)."""
    return models_home() / dataset


def is_inside(path, root):
    """True when ``path`` is ``root`` or lies below it (symlinks resolved; neither need exist)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents
