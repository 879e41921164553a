"""Download a public dataset for users who are online: ``python -m featurepipe.datasets flower_photos``."""

import sys
import tarfile
from pathlib import Path

from .cli import OneLineParser
from .errors import UsageError

DATASETS = {
    "flower_photos": "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
}


def download(name, out="data"):
    """Download and unpack dataset ``name`` into ``out/<name>``; return that folder."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    import keras

    out = Path(out).resolve()
    target = out / name
    if target.is_dir():
        return target
    try:
        archive = keras.utils.get_file(f"{name}.tgz", DATASETS[name], cache_dir=str(out), cache_subdir="downloads")
    except Exception as err:
        raise UsageError(f"cannot download {name} ({type(err).__name__}); offline? pass --data a local "
                         "folder of class folders instead") from None
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return target


def main(argv=None):
    p = OneLineParser(prog="python -m featurepipe.datasets", description=__doc__)
    p.add_argument("name", choices=sorted(DATASETS))
    p.add_argument("--out", default="data")
    args = p.parse_args(argv)
    print(download(args.name, args.out))
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
