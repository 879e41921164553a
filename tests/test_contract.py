"""A feature file that breaks the contract stops every later stage with one line and exit 2."""

import h5py
import numpy as np
import pytest

from featurepipe import audit, compare, report
from featurepipe.cli import run_main
from featurepipe.errors import DataError
from featurepipe.store import STR, load

from featurefiles import separable, write_features


def _replace(f, name, values, dtype=None):
    del f[name]
    f.create_dataset(name, data=values, dtype=dtype)


BROKEN = {
    "short class_names": lambda f: _replace(f, "class_names", ["a", "b"], STR),
    "label beyond the classes": lambda f: _replace(f, "labels", np.where(f["labels"][()] == 2, 7, f["labels"][()])),
    "zero feature columns": lambda f: _replace(f, "features", np.zeros((f["paths"].shape[0], 0), np.float32)),
    "split value": lambda f: _replace(f, "split", ["holdout"] + list(f["split"].asstr()[1:]), STR),
    "duplicate class_names": lambda f: _replace(f, "class_names", ["a", "a", "c"], STR),
    "rows of other lengths": lambda f: _replace(f, "labels", f["labels"][:-3]),
}
MESSAGES = {"short class_names": "outside the 2 class_names", "label beyond the classes": "a label is 7",
            "zero feature columns": "0 columns", "split value": "split value 'holdout'",
            "duplicate class_names": "not unique", "rows of other lengths": "'labels' has 45 rows"}
STAGES = {"audit": (audit.main, ["--seeds", "1", "--n-jobs", "1", "--quiet"]),
          "report": (report.main, []),
          "compare": (compare.main, ["--clf", "logreg", "--n-jobs", "1", "--quiet", "--cv", "2"])}


@pytest.fixture()
def broken_file(tmp_path, request):
    X, y, paths, split = separable()
    path = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    with h5py.File(path, "r+") as f:
        BROKEN[request.param](f)
    return path, request.param


@pytest.mark.parametrize("broken_file", list(BROKEN), indirect=True)
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_broken_file_is_one_line_and_exit_2_in_every_stage(broken_file, stage, capsys):
    path, kind = broken_file
    func, extra = STAGES[stage]
    assert run_main(func, ["--features", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "breaks the feature-file contract" in err and MESSAGES[kind] in err, err


def test_a_good_file_keeps_the_contract(tmp_path):
    X, y, paths, split = separable()
    path = write_features(tmp_path / "feats" / "synth" / "alpha.h5", X, y, paths, split)
    assert len(load(path)) == len(paths) and load(path, features=False).X is None
    with h5py.File(path, "r+") as f:
        BROKEN["split value"](f)
    with pytest.raises(DataError, match="contract"):
        load(path, features=False)
