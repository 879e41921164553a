"""Label a folder of images with a model exported by ``featurepipe export`` (no featurepipe, no TensorFlow).

Needs only Pillow, numpy and the LiteRT runtime::

    python -m venv /tmp/lite && /tmp/lite/bin/pip install pillow numpy ai-edge-litert
    /tmp/lite/bin/python examples/classify_tflite.py MODEL.tflite IMAGE_DIR [--csv out.csv]

The image is read as featurepipe read it for the model (``manifest.json`` beside the file: input
size, resize mode, JPEG decode mode): EXIF orientation applied, RGB, then ``stretch`` (whole image
to size x size), ``crop`` (short side to size, centre crop) or ``pad`` (long side to size, black
borders), bilinear. The model takes those uint8 pixels and returns class probabilities (or scores,
as ``manifest["outputs"]`` says) in the order of ``manifest["classes"]``. Prints
``path<TAB>label<TAB>probability`` per image and the rate on stderr.
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DECODE_MARGIN = {"scaled": 2.0, "exact": 0.0}  # JPEG decoded at >= margin x size (featurepipe's decode modes)


def read_image(path, size, resize="stretch", decode="exact"):
    """An image file as uint8 (size, size, 3) RGB, read as featurepipe's reader reads it."""
    img = Image.open(path)
    side = math.ceil(size * DECODE_MARGIN[decode])
    if side and img.format == "JPEG":
        img.draft(img.mode, (side, side))
    img.load()
    img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if resize == "stretch":
        return np.asarray(img.resize((size, size), Image.BILINEAR))
    scale = size / min(w, h) if resize == "crop" else size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(img.resize((new_w, new_h), Image.BILINEAR))
    if resize == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return resized[top:top + size, left:left + size]
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def image_files(items):
    """Image files under the given files and folders, sorted."""
    found = []
    for item in map(Path, items):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        else:
            found.append(item)
    return found


class Classifier:
    """The exported ``.tflite`` and its manifest: ``classify(path) -> (label, probability)``."""

    def __init__(self, model, threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.manifest = json.loads((Path(model).parent / "manifest.json").read_text())
        self.size = int(self.manifest["input"]["size"])
        self.resize, self.decode = self.manifest["input"]["resize"], self.manifest["input"]["decode"]
        self.classes = self.manifest["classes"]
        self.it = Interpreter(model_path=str(model), num_threads=threads or os.cpu_count() or 1)
        inp = self.it.get_input_details()[0]
        self.it.resize_tensor_input(inp["index"], [1, self.size, self.size, 3], strict=True)
        self.it.allocate_tensors()
        self.inp, self.out = inp["index"], self.it.get_output_details()[0]["index"]

    def scores(self, pixels):
        """uint8 (size, size, 3) -> float32 (n_classes,)."""
        self.it.set_tensor(self.inp, pixels[None])
        self.it.invoke()
        return self.it.get_tensor(self.out)[0]

    def classify(self, path):
        p = self.scores(read_image(path, self.size, self.resize, self.decode))
        k = int(np.argmax(p))
        return self.classes[k], float(p[k])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the exported .tflite (manifest.json beside it)")
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--csv", help="also write path,label,probability here")
    ap.add_argument("--threads", type=int, help="interpreter threads (default: every core)")
    args = ap.parse_args(argv)
    clf = Classifier(args.model, args.threads)
    rows, started = [], time.perf_counter()
    for path in image_files(args.images):
        try:
            label, prob = clf.classify(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            print(f"{path}\terror\t{err}", file=sys.stderr)
            continue
        rows.append((str(path), label, f"{prob:.4f}"))
        print("\t".join(rows[-1]))
    seconds = time.perf_counter() - started
    print(f"{len(rows)} images in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} images/s)", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            csv.writer(fh).writerows([("path", "label", "probability"), *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
