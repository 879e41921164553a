"""TFLite metadata (labels, input normalization) written into an exported ``.tflite``.

MediaPipe's ImageClassifier and the TFLite Task Library read a classifier's class names and input
normalization from metadata inside the file. The writer is MediaPipe's own
``mediapipe.tasks.python.metadata.metadata_writers.image_classifier.MetadataWriter`` from pip
``mediapipe==0.10.21`` (later wheels lack its compiled part). That release pins numpy 1 and
protobuf 4, which TensorFlow 2.21 cannot share an environment with, so ``embed`` uses it

1. in this Python when it imports here, else
2. in the Python named by ``FEATUREPIPE_METADATA_PYTHON`` (a small venv with only
   ``mediapipe==0.10.21``), running this file as a script: it imports nothing of featurepipe.

Without either the file is left without metadata and the manifest says why (docs/export.md).
Input normalization is mean 0 / std 1: the graph takes uint8 pixels 0..255 and normalises each
backbone's input itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = "FEATUREPIPE_METADATA_PYTHON"
WRITER = "mediapipe==0.10.21 MetadataWriter (image_classifier)"


def write_metadata(path, labels):
    """Write labels and input normalization (mean 0, std 1) into the ``.tflite`` at ``path``
    (replaced atomically). Needs ``mediapipe==0.10.21``."""
    from mediapipe.tasks.python.metadata.metadata_writers import image_classifier, metadata_writer

    path = Path(path)
    writer = image_classifier.MetadataWriter.create(
        bytearray(path.read_bytes()), input_norm_mean=[0.0], input_norm_std=[1.0],
        labels=metadata_writer.Labels().add(list(labels)))
    content, _ = writer.populate()
    tmp = path.with_name(f".{path.name}.meta-{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _writer_here():
    try:
        from mediapipe.tasks.python.metadata.metadata_writers import image_classifier  # noqa: F401
    except Exception:  # missing, or the 1.2.x wheel without the compiled part
        return False
    return True


def embed(path, labels):
    """Embed the metadata where a writer is found.

    Returns
    -------
    dict for the manifest: ``embedded`` (bool), ``writer`` or ``why``.
    """
    if _writer_here():
        write_metadata(path, labels)
        return {"embedded": True, "writer": WRITER, "labels": True, "input_norm": {"mean": 0.0, "std": 1.0}}
    python = os.environ.get(ENV)
    if not python:
        why = (f"no TFLite metadata writer: pip install mediapipe==0.10.21 in a separate venv and set "
               f"{ENV} to its python (docs/export.md); labels.txt and manifest.json hold the labels")
        import warnings

        warnings.warn(why, stacklevel=2)
        return {"embedded": False, "why": why}
    done = subprocess.run([python, str(Path(__file__).resolve()), str(path), json.dumps(list(labels))],
                          capture_output=True, text=True, env=_clean_env())
    if done.returncode != 0:
        from .errors import UsageError

        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"{ENV}={python} could not write the TFLite metadata ({last}); it needs "
                         "mediapipe==0.10.21 installed in that Python")
    return {"embedded": True, "writer": f"{WRITER} via {ENV}", "labels": True,
            "input_norm": {"mean": 0.0, "std": 1.0}}


def _clean_env():
    """This environment without PYTHONPATH/PYTHONHOME (the other Python keeps its own packages)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


if __name__ == "__main__":  # python tflite_metadata.py MODEL.tflite '["label", ...]'
    write_metadata(sys.argv[1], json.loads(sys.argv[2]))
