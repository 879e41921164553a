"""Where featurepipe keeps things: the one place that knows its folders.

Environment variables come first, then defaults relative to the working directory:

* ``data_home()``     ``$FEATUREPIPE_DATA`` or ``./data``: datasets and ``features/``
* ``models_home()``   ``$FEATUREPIPE_MODELS`` or ``./models``: ``<dataset>/`` per feature folder
* ``cache_dir()``     ``$FEATUREPIPE_CACHE`` or ``~/.cache/featurepipe``: converted models, engine choices
* ``latest_pointer()`` ``data_home()/features/latest.json``: the feature files of the last extract run

This module imports only ``errors`` from featurepipe, so every module may use it.
"""

import json
import os
from pathlib import Path

from .errors import UsageError

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


def models_dir_for(feature_file, *, root=None, claim=False):
    """``<root>/<dataset>/`` for a feature file (root: ``models_home()``), checked to belong to
    that file's folder: two data sets whose feature folders share a name never share models.

    With ``claim``, the folder is created and records the feature folder it belongs to.
    Raises UsageError when it already belongs to another feature folder.
    """
    source = Path(feature_file).resolve().parent
    folder = Path(root if root is not None else models_home()) / source.name
    marker = folder / SOURCE_MARKER
    try:
        recorded = json.loads(marker.read_text())["features"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is not None and recorded != str(source):
        raise UsageError(f"'{folder}' holds the models of the feature files in '{recorded}', not "
                         f"'{source}'; extract this data set with --out into a folder of another "
                         f"name (or remove {marker} if those files moved here)")
    if claim and recorded is None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"features": str(source)}))
        os.replace(tmp, marker)
    return folder


def is_inside(path, root):
    """True when ``path`` is ``root`` or lies below it (symlinks resolved; neither need exist)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents
