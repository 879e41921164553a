"""The parity check of an exported file against the model it came from (``featurepipe.export``).

``parity(run, source, paths, truth, ...)`` compares, on held-out images:
(a) the exported file and featurepipe's own feature models + estimator on the same decoded pixels
(top-1 equal on every image, max |Δ| <= ``MAX_ABS_DIFF`` for float32 files);
(b) the exported file on the pixels the manifest names and ``featurepipe predict`` reading the
files itself (top-1 agreement >= ``MIN_AGREEMENT``), with the test accuracy of both.
"""

import shutil
import time
from pathlib import Path

import numpy as np

from .errors import ImageError

MAX_ABS_DIFF = 1e-4  # level (a) bound for float32 exports
MIN_AGREEMENT = 0.99  # level (b) bound
MAX_ACCURACY_LOSS = 0.01  # a quantized export losing more than 1 point of test accuracy is refused
BATCH = 32


def resizer(form, size, to):
    """uint8 (n, size, size, 3) -> (n, to, to, 3) by ``resize_pixels`` written in ``form`` and run on
    its runtime: the very kernel the exported graph resizes with (LiteRT's bilinear resize rounds
    0.04 % of pixels one level apart from TensorFlow's)."""
    import tempfile

    import keras

    from .export import resize_pixels

    pixels = keras.Input((size, size, 3), dtype="uint8")
    model = keras.Model(pixels, keras.layers.Lambda(lambda x: resize_pixels(x, to))(pixels))
    folder = Path(tempfile.mkdtemp(prefix="featurepipe-resize-"))
    try:
        path = folder / f"resize{form.suffix or '_model'}"
        form.write(model, path)
        run = form.runner(path)  # loaded (or mapped) now: the file may go
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return lambda batch: np.asarray(run(batch)).astype(np.uint8)


def parity(run, source, paths, truth, *, float32, output, form):
    from .fit import join_blocks
    from .reader import Target, read_images

    models = source.feature_models()
    resizers = {m.spec.image_size: resizer(form, source.size, m.spec.image_size) for m in models
                if m.spec.image_size != source.size}
    reads = list(read_images(paths, [Target(source.size, source.resize, source.decode)]))
    good = [i for i, r in enumerate(reads) if not isinstance(r, ImageError)]
    if not good:
        return {"passed": False, "images": len(paths), "unreadable": len(paths),
                "why": f"none of the {len(paths)} test images could be read (first: {reads[0]}); "
                       "were they moved since extraction?"}
    exported, ours, seconds = [], [], 0.0
    for s in range(0, len(good), BATCH):
        pixels = np.stack([reads[i].outputs[0] for i in good[s:s + BATCH]])
        started = time.perf_counter()
        exported.append(run(pixels))
        seconds += time.perf_counter() - started
        blocks = [m(resizers[m.spec.image_size](pixels) if m.spec.image_size in resizers else pixels)
                  for m in models]
        X = join_blocks(blocks)
        ours.append(source.estimator.predict_proba(X) if output == "probabilities"
                    else _scores(source.estimator.decision_function(X)))
    exported, ours = np.concatenate(exported), np.concatenate(ours)
    diff = float(np.abs(exported - ours).max())
    top1_same = float(np.mean(exported.argmax(1) == ours.argmax(1)))
    predicted = source.loaded.predict_paths([paths[i] for i in good])
    fp_labels = [p.label for p in predicted]
    ex_labels = [source.labels[k] for k in exported.argmax(1)]
    agreement = float(np.mean([a == b for a, b in zip(ex_labels, fp_labels)]))
    true = [truth[i] for i in good]
    acc_ex = float(np.mean([a == t for a, t in zip(ex_labels, true)]))
    acc_fp = float(np.mean([a == t for a, t in zip(fp_labels, true)]))
    level_a = top1_same == 1.0 and diff <= MAX_ABS_DIFF if float32 else None  # quantized: reported
    level_b = agreement >= MIN_AGREEMENT
    accuracy_ok = acc_ex - acc_fp >= -MAX_ACCURACY_LOSS
    return {
        "images": len(paths), "unreadable": len(paths) - len(good),
        "a_same_pixels": {"top1_equal": top1_same, "max_abs_diff": diff, "bound": MAX_ABS_DIFF if float32 else None,
                          "passed": level_a},
        "b_from_files": {"top1_agreement": agreement, "bound": MIN_AGREEMENT, "passed": level_b},
        "accuracy": {"exported": acc_ex, "featurepipe": acc_fp},
        "accuracy_change": acc_ex - acc_fp, "accuracy_ok": accuracy_ok,
        "exported_images_per_second": len(good) / seconds if seconds else None,
        "passed": bool(level_a and level_b) if float32 else accuracy_ok,
    }


def _scores(decision):
    decision = np.asarray(decision, dtype=np.float32)
    return np.stack([-decision, decision], axis=1) if decision.ndim == 1 else decision


def summary(parity):
    """One paragraph of the parity result, as printed."""
    if "a_same_pixels" not in parity:
        return f"parity: not checked ({parity.get('why', '')})"
    a, b, acc = parity["a_same_pixels"], parity["b_from_files"], parity["accuracy"]
    bound = f" (bound {a['bound']:g})" if a["bound"] else ""
    verdict = {True: "ok", False: "FAILED", None: "reported (quantized)"}[a["passed"]]
    return (f"parity (a) same pixels: top-1 equal on {100 * a['top1_equal']:.2f} % of {parity['images']} images, "
            f"max |Δ| {a['max_abs_diff']:.2e}{bound}: {verdict}\n"
            f"parity (b) from the files: top-1 agreement with featurepipe predict {100 * b['top1_agreement']:.2f} % "
            f"(bound {100 * b['bound']:.0f} %): {'ok' if b['passed'] else 'FAILED'}\n"
            f"test accuracy: exported {100 * acc['exported']:.2f} %, featurepipe {100 * acc['featurepipe']:.2f} % "
            f"({100 * parity['accuracy_change']:+.2f} points)")
