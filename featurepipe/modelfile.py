"""Model files: the one place that saves, verifies and loads the models featurepipe writes.

``featurepipe.fit`` saves each model with ``save_bundle`` as ``models/<dataset>/<stem>.skops``:
a ``skops.io`` file, which is data, not code: loading it builds only the types it is told to
trust (``TRUSTED_TYPES`` plus scikit-learn's and numpy's own, which skops trusts by default) and
refuses anything else before creating it. ``save_bundle`` returns the file's sha256, which fit
records in the results row (``model_sha256``) and in the JSON sidecar.

Every *implicit* load (the report, the audit, compare's report step, predict without
``--model``) goes through ``load_written``: the path must lie inside ``models/<dataset>/``
(symlinks resolved) and the file's sha256 must be the one recorded with its row; the bytes that
were hashed are the bytes loaded. A file outside the folder, with another hash or of another
format is refused (``ModelRefused``: one line, exit 2, whatever stage asked) before a byte of it
is interpreted. A file holding types outside the trusted list (a model of the user's own
``--clf package.module:ClassName``), a missing file or a row without a hash (an older
featurepipe) is a plain ``DataError``: nothing of it is built, and the report and the audit pass
over it with a warning.

A model the user names (``predict --model FILE``) is the user's choice: ``load_user`` loads a
``.skops`` trusting the types the file asks for, and a ``.joblib`` (older featurepipe, or the
user's own) with ``joblib.load``, which runs any code a pickle holds (docs/fit.md).

To let featurepipe save a new estimator class, add its ``module.ClassName`` to ``TRUSTED_TYPES``
(tests/test_modelfile.py saves and loads every registry classifier with this list).
"""

import hashlib
import os
from pathlib import Path

from .errors import DataError, UsageError

MODEL_FORMAT = "featurepipe-model/1"
MODEL_SUFFIX = ".skops"

# Types outside skops' default trust (scikit-learn estimators, numpy arrays, builtins) that the
# classifiers of featurepipe.classifiers need; one place, extend it for a new estimator class.
TRUSTED_TYPES = (
    "featurepipe.classifiers.RBFKernel",
    "featurepipe.estimators.BlockwiseStandardScaler",
    "featurepipe.estimators.FaissKNN",
    "featurepipe.estimators.ScaledNystroem",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.tree._tree.Tree",
)


class ModelRefused(DataError):
    """A model file an implicit load must not read: outside its folder, replaced, or holding
    untrusted types. Never caught by a stage (one line, exit 2), unlike a missing or old file."""


def sha256_of_bytes(data):
    """Hex sha256 of ``data`` (bytes)."""
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path):
    """Hex sha256 of the file at ``path``, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_bundle(bundle, path):
    """Write ``bundle`` (a dict holding the fitted model) to ``path`` atomically; its sha256.

    The file is written under a temporary name and renamed into place, so a reader sees the old
    file or the new one, never half of one. (skops builds the whole zip in memory before writing
    it: for a moment the model's arrays are held about three more times; the kNN plan counts it.)
    """
    import skops.io as sio

    from .store import atomic_path

    with atomic_path(path) as tmp:
        sio.dump(bundle, tmp)
        return sha256_of_file(tmp)


def written_path(path, folder):
    """Where a results row's model file is: ``path``, or, when nothing is there (the models
    folder was moved or renamed), the file of that name in ``folder``."""
    path = Path(str(path))
    moved = Path(folder) / path.name
    return moved if not os.path.lexists(path) and moved.is_file() else path


def check_written(path, *, folder, sha256):
    """The bytes of ``path`` when it is a model featurepipe wrote into ``folder``; DataError else.

    Parameters
    ----------
    path : str or Path
        As a results row or sidecar names it.
    folder : str or Path
        ``models/<dataset>/``: the file must resolve to a file directly inside it.
    sha256 : str
        The hash recorded with the row (empty: refused, the row predates hashes).
    """
    path, folder = written_path(path, folder), Path(folder)
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(folder)):
        raise ModelRefused(f"refusing to load '{path}': it is not a model file inside '{folder}' (a "
                        "results row names it); run featurepipe compare again to refit the row")
    if not sha256:
        raise DataError(f"refusing to load '{path}': its results row records no sha256 (written by an "
                        "older featurepipe); run featurepipe compare --force to refit it")
    try:
        data = real.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read model '{path}' ({err.strerror or err})") from None
    if sha256_of_bytes(data) != sha256:
        raise ModelRefused(f"refusing to load '{path}': its sha256 is not the one recorded when it was "
                        "fitted (the file was replaced); run featurepipe compare --force to refit it")
    return data


def load_written(path, *, folder, sha256):
    """The bundle of a model featurepipe wrote (``check_written``), loaded with ``TRUSTED_TYPES`` only."""
    data = check_written(path, folder=folder, sha256=sha256)
    if Path(path).suffix.lower() != MODEL_SUFFIX:
        raise ModelRefused(f"refusing to load '{path}': featurepipe writes {MODEL_SUFFIX} model files only")
    return _checked(_skops_loads(data, path, trusted=list(TRUSTED_TYPES)), path)


def load_user(path):
    """The bundle of a model file the user named (``--model``): a ``.skops`` or a ``.joblib``.

    The user trusts the file: a ``.joblib`` is a pickle and runs any code it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file not found: '{path}'")
    if path.suffix.lower() == MODEL_SUFFIX:
        import skops.io as sio

        data = path.read_bytes()
        try:
            trusted = sio.get_untrusted_types(data=data)
        except Exception as err:
            raise DataError(f"'{path}' is not a featurepipe model ({type(err).__name__}: {err})") from None
        return _checked(_skops_loads(data, path, trusted=list(TRUSTED_TYPES) + list(trusted)), path)
    import joblib

    try:
        bundle = joblib.load(path)
    except Exception as err:
        raise DataError(f"'{path}' is not a featurepipe model ({type(err).__name__}: {err})") from None
    return _checked(bundle, path)


def _skops_loads(data, path, *, trusted):
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    try:
        return sio.loads(data, trusted=trusted)
    except UntrustedTypesFoundException as err:  # e.g. the user's own --clf class: skipped, never built
        raise DataError(f"not loading '{path}': it holds types featurepipe does not trust ({err}); "
                        "if you trust the file, pass it as predict --model") from None
    except Exception as err:
        raise DataError(f"'{path}' is not a featurepipe model ({type(err).__name__}: {err})") from None


def _checked(bundle, path):
    if not isinstance(bundle, dict) or bundle.get("format") != MODEL_FORMAT:
        raise DataError(f"'{path}' is not a featurepipe model (saved by featurepipe fit or compare)")
    return bundle


def is_features_model(path):
    """True for a path naming a scikit-learn model file (``.skops``, or an older ``.joblib``)."""
    return Path(str(path)).suffix.lower() in (MODEL_SUFFIX, ".joblib")
