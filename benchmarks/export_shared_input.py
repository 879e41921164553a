"""What one shared input costs an exported model (docs/export.md, "One input for backbones of
different sizes"): featurepipe's feature models + estimator on one shared input resized as the
export graph resizes it (tf.image.resize), against predict's own per-backbone reads, on the test
photos; top-1 agreement (level (b) of the parity check), accuracy, mean pixel difference.

    python benchmarks/export_shared_input.py MODELS_DIR [STEP] [SIZE:METHOD ...]

MODELS_DIR holds <features>__{logreg,mlp,svm-rbf,svm}.skops (or .joblib) of the three default
backbones; STEP takes every STEP-th test photo (default 1); METHOD is bilinear, antialias or area.
"""
import sys
import time
import numpy as np
import tensorflow as tf
from pathlib import Path
from featurepipe.modelfile import load_user
from featurepipe.predict import feature_models
from featurepipe.reader import Target, read_images
from featurepipe.fit import join_blocks
from featurepipe.store import load, read_attrs
from featurepipe.settings import ExtractionSettings

M = Path(sys.argv[1])
stem = "squeezenet+efficientnet_lite0+efficientnet_lite2"
bundles = {c: load_user(path) for c in ("logreg", "mlp", "svm-rbf", "svm")
           for path in [M / f"{stem}__{c}.skops", M / f"{stem}__{c}.joblib"] if path.exists()}
b0 = next(iter(bundles.values()))
models = feature_models(b0, engine="tf")
f = load(b0["blocks"][0]["file"], features=False)
root = Path(str(read_attrs(b0["blocks"][0]["file"])["data_root"]))
rows = np.flatnonzero(f.split == "test")
step = int(sys.argv[2]) if len(sys.argv) > 2 else 1
rows = rows[::step]
paths = [str(root / f.paths[i]) for i in rows]
truth = np.array([int(f.y[i]) for i in rows])
spec = [m.spec for m in models]
resize, decode = spec[0].resize, spec[0].decode
print(len(paths), "photos; sizes", [s.image_size for s in spec], resize, decode, flush=True)

def feats(pixel_sets):
    return join_blocks([np.concatenate([m(p[s:s + 32]) for s in range(0, len(p), 32)])
                        for m, p in zip(models, pixel_sets)])

def labels(X):
    out = {}
    for c, b in bundles.items():
        est = b["model"]
        out[c] = np.asarray(est.classes_)[est.predict_proba(X).argmax(1)]
    return out

t = time.time()
reads = list(read_images(paths, [s.target() for s in spec]))
ref = labels(feats([np.stack([r.outputs[k] for r in reads]) for k in range(len(spec))]))
print("reference (predict's reads) done", round(time.time() - t), "s", flush=True)

def resized(pix, to, how):
    if pix.shape[1] == to:
        return pix
    x = tf.cast(pix, tf.float32)
    if how == "bilinear":
        y = tf.image.resize(x, (to, to), method="bilinear")
    elif how == "antialias":
        y = tf.image.resize(x, (to, to), method="bilinear", antialias=True)
    elif how == "area":
        y = tf.image.resize(x, (to, to), method="area")
    return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), tf.uint8).numpy()

variants = [(int(v.split(":")[0]), v.split(":")[1]) for v in sys.argv[3:]] or \
    [(260, "bilinear"), (520, "bilinear"), (780, "bilinear")]
for S, how in variants:
    t = time.time()
    shared = np.stack([r.outputs[0] for r in read_images(paths, [Target(S, resize, decode)])])
    sets = [resized(shared, s.image_size, how) for s in spec]
    mad = [float(np.abs(a.astype(int) - np.stack([r.outputs[k] for r in reads]).astype(int)).mean())
           for k, a in enumerate(sets)]
    got = labels(feats(sets))
    agree = {c: f"{100 * np.mean(got[c] == ref[c]):.2f}%" for c in got}
    acc = {c: f"{100 * np.mean(got[c] == truth):.2f}/{100 * np.mean(ref[c] == truth):.2f}" for c in got}
    print(f"S={S} {how}: agreement {agree}; acc shared/predict {acc}; mean |dpixel| per backbone "
          f"{[round(v, 2) for v in mad]}; {round(time.time() - t)} s", flush=True)
