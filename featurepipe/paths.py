"""Where featurepipe keeps things: the one place that knows its folders.

Environment variables come first, then defaults relative to the working directory:

* ``data_home()``     ``$FEATUREPIPE_DATA`` or ``./data``: datasets and ``features/``
* ``models_home()``   ``$FEATUREPIPE_MODELS`` or ``./models``: ``<dataset>/`` per feature folder
* ``cache_dir()``     ``$FEATUREPIPE_CACHE`` or ``~/.cache/featurepipe``: converted models, engine choices
* ``default_out_dir(data)`` ``data_home()/features/<dataset>``, or ``./featurepipe-out/<dataset>``
  when the first lies inside the image folder (``--data data`` with the images right in ``./data``)
* ``latest_pointer()`` ``cache_dir()/latest/<digest of data_home()>.json``: the feature files of the
  last extract run made with this data home. It lives in the cache, never beside the images, so no
  run ever writes into an input tree.

This module imports only ``errors`` from featurepipe, so every module may use it.
"""

import hashlib
import json
import os
from pathlib import Path

from .errors import UsageError

SOURCE_MARKER = ".featurepipe-source.json"  # in models/<dataset>/: the feature folder it belongs to
FALLBACK_OUT = "featurepipe-out"  # in the working folder, when data_home()/features is inside the images


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


def own_output_folders():
    """Every folder featurepipe writes into: the models root, the feature folder, the fallback
    output folder and the cache. The image walker never lists anything that resolves into one
    of them (``featurepipe.images``), so the tool's own outputs never become a class."""
    return [models_home(), features_home(), Path(FALLBACK_OUT), cache_dir()]


def latest_pointer():
    """The file naming the feature files of the most recent extract run with this data home."""
    home = str(data_home().resolve())
    return cache_dir() / "latest" / f"{hashlib.sha1(home.encode()).hexdigest()[:16]}.json"


def default_out_dir(data, *, images_folder=None):
    """Where a data set's feature files go when no ``--out`` is given.

    ``data_home()/features/<name of the data folder, or the CSV's stem>``; when that lies inside
    ``images_folder`` (default: ``data`` when it is a folder; a list: any folder of it), e.g.
    ``--data data`` with class folders right in ``./data``, ``./featurepipe-out/<name>``. Raises
    UsageError when both lie inside it (the working folder is inside the image folder).
    """
    data = Path(data)
    name = data.stem if data.is_file() else data.resolve().name
    tree = images_folder if images_folder is not None else (data if data.is_dir() else None)
    trees = [] if tree is None else [tree] if isinstance(tree, (str, Path)) else list(tree)
    for out in (features_home() / name, Path(FALLBACK_OUT) / name):
        if not any(is_inside(out, t) for t in trees):
            return out
    tree = next(t for t in trees if is_inside(out, t))
    raise UsageError(f"the working folder is inside the image folder '{tree}', so every default "
                     "output folder would be too; pass --out DIR outside it (or run from another folder)")


def check_outside_input(images_folder, folder, what):
    """UsageError when ``folder`` (an output, named ``what``) lies inside ``images_folder``."""
    if is_inside(folder, images_folder):
        raise UsageError(f"{what} '{folder}' is inside the image folder '{images_folder}'; the next "
                         "run would read it as a class. Pass a folder outside it")


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
                         f"name, e.g. --out {source.parent / (source.name + '-2')} (or remove {marker} "
                         "if those files moved here)")
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
