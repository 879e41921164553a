"""One self-contained HTML page to look at: results, mistakes, leaks and suspects, with the images.

``report(feature_files)`` reads what the other stages wrote for a dataset — the feature files'
rows and attributes, ``models/<dataset>/results.csv`` and the best row's saved model, and the
audit's CSVs under ``models/<dataset>/audit/`` when they exist — and writes
``models/<dataset>/report.html``. The page needs no network and no server: CSS, JavaScript, charts
(SVG) and the thumbnails (small WebP data URIs, each image stored once) are all inline, and a
Content-Security-Policy forbids every fetch. Each section shows a bounded number of images and
says how many it left out, so the file stays a few MB on large datasets.

``python -m featurepipe.report`` only parses arguments and prints the path.
"""

import base64
import csv
import io
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np

from . import __version__
from .cli import OneLineParser
from .csvcells import unescape_row
from .errors import DataError
from .fit import load_feature_set, resolve_feature_files
from .paths import dataset_name, models_dir_for
from .plotting import plain, plain_all
from .results import SELECTION_RULE, can_be_chosen, current_rows, ranked
from .store import load, load_part, save_part

AUDIT_COMMAND = "python -m featurepipe.audit"
COMPARE_COMMAND = "python -m featurepipe.compare"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Limits:
    """How many images each section shows at most (the rest are counted, not shown)."""

    cell_images: int = 200
    cell_total: int = 2000      # images over all confusion cells (each cell's share levelled to fit)
    matrix_classes: int = 100   # more classes: no confusion matrix (per-class scores and mistakes only)
    mistakes: int = 48
    duplicate_pairs: int = 40
    suspects: int = 48
    map_points: int = 1000
    skipped: int = 50
    thumb_px: int = 96


@dataclass(frozen=True)
class Column:
    """A results-table column: CSV key, heading, and whether it sorts as a number."""

    key: str
    heading: str
    numeric: bool = True
    digits: int = 4
    optional: bool = False


COLUMNS = (
    Column("features", "features", numeric=False),
    Column("clf", "classifier", numeric=False),
    Column("cv_mean", "CV mean ± std"),
    Column("test_accuracy", "test accuracy"),
    Column("test_accuracy_no_leaks", "test accuracy, no leaks", optional=True),
    Column("test_macro_f1", "macro-F1"),
    Column("fit_seconds", "fit s", digits=1),
    Column("predict_ms_per_image", "predict ms/img", digits=3),
    Column("best_params", "best params", numeric=False),
    Column("status", "status", numeric=False),
)

# Attributes shown per feature file in the header, in this order.
PROVENANCE = ("backbone", "layer", "pooling", "image_size", "resize", "augment", "engine",
              "weights_source", "weights_sha256", "featurepipe_version", "tensorflow_version",
              "keras_version", "n_rows", "updated")


@dataclass(frozen=True)
class ReportResult:
    """What ``report`` wrote."""

    path: Path
    size_bytes: int
    best: str = ""
    n_thumbnails: int = 0
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_csv(path):
    """Rows of a CSV as dicts of strings, or None when the file is absent or unreadable."""
    try:
        with open(path, newline="") as fh:
            return [unescape_row(r) for r in csv.DictReader(fh)]
    except FileNotFoundError:
        return None
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        warnings.warn(f"{path} is unreadable ({err}); its section is left out", stacklevel=2)
        return None


def _has_columns(rows, path, columns):
    if rows and not set(columns) <= set(rows[0]):
        warnings.warn(f"{path} lacks columns {sorted(set(columns) - set(rows[0]))}; its section is left out",
                      stacklevel=2)
        return False
    return True


def results_rows(folder):
    """results.csv's rows of the folder's current feature files (``featurepipe.results.current_rows``),
    ranked (best CV first), and how many rows of other feature files it also holds."""
    rows = read_csv(Path(folder) / "results.csv") or []
    current = current_rows(rows, folder)
    return ranked(current), len(rows) - len(current)


class Thumbnails:
    """Images the page shows, each stored once as a small data URI and referred to by id."""

    def __init__(self, data_root, *, px):
        self.data_root = Path(data_root) if data_root else None
        self.px = px
        self.ids = {}

    def ref(self, rel_path):
        """The id the page uses for ``rel_path`` (its thumbnail is made in ``encode``)."""
        return self.ids.setdefault(str(rel_path), str(len(self.ids)))

    def encode(self):
        """{id: data URI}; images that cannot be read are left out (the page says so)."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            uris = pool.map(self._uri, list(self.ids))
            return {i: uri for i, uri in zip(self.ids.values(), uris) if uri}

    def _uri(self, rel_path):
        from PIL import Image, ImageOps

        path = Path(rel_path)
        if not path.is_absolute():
            if self.data_root is None:
                return None
            path = self.data_root / path
        try:
            with warnings.catch_warnings(), Image.open(path) as img:
                warnings.simplefilter("ignore")
                img.draft("RGB", (2 * self.px, 2 * self.px))  # JPEG: decode at a reduced scale
                img = ImageOps.exif_transpose(img).convert("RGB")
                img.thumbnail((self.px, self.px), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="WEBP", quality=60, method=2)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- sections


def header_section(files, *, limits):
    """Dataset counts per class and split, skipped files, and each file's provenance."""
    loaded = [load(f, features=False) for f in files]
    rows = {}
    for f in loaded:
        rows.update(zip(f.paths, zip(f.y.tolist(), f.split)))
    class_names = loaded[0].class_names
    counts = np.zeros((len(class_names), len(SPLITS)), dtype=int)
    for label, split in rows.values():
        counts[label, SPLITS.index(split)] += 1
    splits = [s for i, s in enumerate(SPLITS) if counts[:, i].any()]
    skipped = sorted({tuple(s) for f in loaded for s in f.skipped})
    return {
        "class_names": class_names,
        "splits": splits,
        "counts": [[int(counts[c, SPLITS.index(s)]) for s in splits] + [int(counts[c].sum())]
                   for c in range(len(class_names))],
        "split_totals": [int(counts[:, SPLITS.index(s)].sum()) for s in splits] + [int(counts.sum())],
        "skipped": skipped[:limits.skipped],
        "n_skipped": len(skipped),
        "files": [{"name": Path(f.source).stem, "path": str(f.source),
                   "attrs": [(k, f.attrs[k]) for k in PROVENANCE if k in f.attrs]} for f in loaded],
        "data_root": next((str(f.attrs["data_root"]) for f in loaded if f.attrs.get("data_root")), ""),
    }


def results_section(rows):
    """The table's columns (the optional ones only when present) and cells with sort values."""
    columns = [c for c in COLUMNS if not c.optional or any(r.get(c.key) for r in rows)]
    table = []
    for r in rows:
        cells = []
        for c in columns:
            raw = r.get(c.key, "")
            if not c.numeric:
                cells.append({"text": raw, "sort": raw})
                continue
            value = _number(raw)
            text = "–" if math.isnan(value) else f"{value:.{c.digits}f}"
            if c.key == "cv_mean" and not math.isnan(value):
                text += f" ± {_number(r.get('cv_std')):.4f}"
            cells.append({"text": text, "sort": "" if math.isnan(value) else repr(value)})
        table.append(cells)
    return {"columns": columns, "rows": table}


def best_model(rows, folder):
    """(row, loaded model bundle) of the best row by CV (``ranked``) whose scikit-learn model is
    saved, or None. The test accuracy plays no part in the choice."""
    from .modelfile import ModelRefused, is_features_model
    from .predict import load_bundle

    for r in ranked(rows):
        model = Path(r.get("model") or "")
        if not can_be_chosen(r) or not is_features_model(model):
            continue
        try:  # only a file featurepipe wrote into this folder, with the row's sha256
            return r, load_bundle(model, written_in=folder, sha256=r.get("model_sha256"))
        except ModelRefused:
            raise
        except Exception as err:  # missing, old or broken: try the next row
            warnings.warn(f"{err}; trying the next row", stacklevel=2)
    return None


def cached(folder, name, key, compute):
    """``compute()`` (an array), kept in ``folder/.report-cache/<name>.npz`` and reused for the same ``key``.

    A report written by compare leaves the slow parts (the map, the best model's predictions) here,
    so the next report of the same data only reads them.
    """
    path = Path(folder) / ".report-cache" / f"{name}.npz"
    saved = load_part(path)
    if saved is not None and str(saved.get("key")) == key:
        return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_part(path, key=np.array(key), value=value)
    return value


def _digest(*parts):
    import hashlib

    h = hashlib.sha1()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()


def best_section(row, bundle, thumbs, *, limits, folder):
    """Predictions of the best model on its test rows: per-class scores, confusion cells, mistakes."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    fs = load_feature_set([b["file"] for b in bundle["blocks"]])
    test = np.flatnonzero(fs.split == "test")
    if len(test) == 0:
        return None, fs, None
    model = bundle["model"]
    key = _digest(bundle.get("created"), row.get("key"), row.get("features"), row.get("clf"), fs.X[test])
    proba = cached(folder, "best-proba", key, lambda: model.predict_proba(fs.X[test]))
    pred = np.asarray(model.classes_)[np.argmax(proba, axis=1)]
    prob = proba.max(axis=1)
    true = fs.y[test]
    names = fs.class_names
    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    matrix = confusion_matrix(true, pred, labels=labels)

    def item(k):
        return {"t": thumbs.ref(fs.paths[test[k]]), "path": fs.paths[test[k]], "true": names[true[k]],
                "pred": names[pred[k]], "prob": round(float(prob[k]), 4)}

    cells, cap = {}, 0
    if len(labels) <= limits.matrix_classes:
        allowance = cell_allowance(matrix, per_cell=limits.cell_images, total=limits.cell_total)
        cap = int(allowance.max())
        order = np.lexsort((-prob, pred, true))  # by cell, most confident first
        starts = np.searchsorted(true[order] * len(labels) + pred[order], np.arange(len(labels) ** 2))
        for t in labels:
            for p in labels:
                at = t * len(labels) + p
                members = order[starts[at]:starts[at] + int(allowance[t, p])]
                cells[f"{t},{p}"] = {"n": int(matrix[t, p]), "items": [item(k) for k in members]}
    wrong = np.flatnonzero(true != pred)
    wrong = wrong[np.argsort(-prob[wrong], kind="stable")]
    predictions = {"test_rows": test, "pred": pred}
    return {
        "name": f"{row['features']} / {row['clf']}",
        "accuracy": float(np.mean(true == pred)),
        "row_accuracy": _number(row.get("test_accuracy")),
        "cv": f"{_number(row.get('cv_mean')):.4f} ± {_number(row.get('cv_std')):.4f}",
        "n_test": len(test),
        "per_class": [{"name": names[c], "precision": precision[c], "recall": recall[c], "f1": f1[c],
                       "support": int(support[c])} for c in labels],
        "confusion": matrix.tolist() if len(labels) <= limits.matrix_classes else None,
        "class_names": names,
        "cells": cells,
        "cell_cap": cap,
        "mistakes": [item(k) for k in wrong[:limits.mistakes]],
        "n_mistakes": len(wrong),
    }, fs, predictions


def cell_allowance(counts, *, per_cell, total):
    """How many images each confusion cell shows: at most ``per_cell``, at most ``total`` over all
    cells; small cells show all their images, large ones are levelled (the same share each, the
    remainder one more for the first cells that have more). ndarray shaped like ``counts``."""
    counts = np.asarray(counts)
    lo, hi = 0, per_cell
    while lo < hi:  # the largest level whose sum fits
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    allowance = np.minimum(counts, lo)
    if lo < per_cell:
        room = int(total - allowance.sum())
        more = np.flatnonzero(counts.ravel() > lo)[:max(room, 0)]
        allowance.ravel()[more] += 1
    return allowance


def duplicates_section(audit_dir, thumbs, *, limits):
    """Near-duplicate pairs, leaks (pairs across splits) first, then by cosine."""
    path = Path(audit_dir) / "duplicates.csv"
    rows = read_csv(path)
    if rows is None or not _has_columns(rows, path, ("path_a", "path_b", "split_a", "split_b", "cosine")):
        return None
    rows.sort(key=lambda r: (r["split_a"] == r["split_b"], -np.nan_to_num(_number(r["cosine"]), nan=-1)))
    shown = [{"a": {"t": thumbs.ref(r["path_a"]), "path": r["path_a"], "split": r["split_a"]},
              "b": {"t": thumbs.ref(r["path_b"]), "path": r["path_b"], "split": r["split_b"]},
              "cosine": _number(r["cosine"]), "leak": r["split_a"] != r["split_b"]}
             for r in rows[:limits.duplicate_pairs]]
    return {"pairs": shown, "n": len(rows), "n_leaks": sum(r["split_a"] != r["split_b"] for r in rows)}


def suspects_section(audit_dir, thumbs, *, limits):
    """Label suspects in the audit's order (most suspicious first)."""
    path = Path(audit_dir) / "suspects.csv"
    rows = read_csv(path)
    if rows is None or not _has_columns(rows, path, ("path", "split", "given", "suggested", "score")):
        return None
    shown = [{"t": thumbs.ref(r["path"]), "path": r["path"], "split": r["split"], "given": r["given"],
              "suggested": r["suggested"], "score": _number(r["score"])} for r in rows[:limits.suspects]]
    return {"items": shown, "n": len(rows)}


def learning_curve_section(audit_dir):
    """The learning curve as inline SVG from learning_curve.csv, or the audit's PNG; None if neither."""
    path = Path(audit_dir) / "learning_curve.csv"
    rows = read_csv(path)
    columns = ("features", "clf", "n_per_class", "accuracy_mean", "accuracy_std")
    if rows and _has_columns(rows, path, columns):
        return {"svg": learning_curve_svg(rows)}
    png = Path(audit_dir) / "learning_curve.png"
    if png.is_file():
        return {"png": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")}
    return None


def audit_summary(audit_dir):
    """Scalar entries of the audit's summary.json (nested values left out)."""
    try:
        summary = json.loads((Path(audit_dir) / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warnings.warn(f"{audit_dir}/summary.json is unreadable ({err})", stacklevel=2)
        return None
    if not isinstance(summary, dict):
        return None
    return [(k, v) for k, v in summary.items() if isinstance(v, (str, int, float, bool))]


def audit_notes(audit_dir):
    """The audit's ``notes`` (what it sampled or approximated, what it could not search), or []."""
    try:
        notes = json.loads((Path(audit_dir) / "summary.json").read_text()).get("notes", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in notes] if isinstance(notes, list) else []


def map_section(fs, predictions, thumbs, *, limits, seed, folder):
    """A t-SNE map of the feature set: every test row, then a seeded sample of the others."""
    test = predictions["test_rows"] if predictions else np.flatnonzero(fs.split == "test")
    others = np.setdiff1d(np.arange(len(fs.paths)), test)
    rng = np.random.default_rng(seed)
    shown = np.arange(len(test))  # positions in test: every one, or a seeded sample past the limit
    if len(test) > limits.map_points:
        shown = np.sort(rng.choice(len(test), limits.map_points, replace=False))
    room = max(0, limits.map_points - len(shown))
    rows = np.concatenate([test[shown], rng.permutation(others)[:room]]).astype(int)
    if len(rows) < 5:
        return None
    xy = cached(folder, "map", _digest(fs.X[rows], seed, TSNE_ITERATIONS), lambda: embed_2d(fs.X[rows], seed=seed))
    mistake = np.full(len(rows), -1)
    pred = np.full(len(rows), -1)
    if predictions:
        n_test = len(shown)
        pred[:n_test] = predictions["pred"][shown]
        mistake[:n_test] = pred[:n_test] != fs.y[rows[:n_test]]
    points = [[round(float(x), 4), round(float(y), 4), int(fs.y[r]), int(m), int(p), thumbs.ref(fs.paths[r]),
               str(fs.paths[r])] for (x, y), r, m, p in zip(xy, rows, mistake, pred)]
    return {"points": points, "n": len(fs.paths), "method": "t-SNE (scikit-learn)", "name": fs.name,
            "n_mistakes": int((mistake == 1).sum()), "n_test": len(test), "n_test_shown": len(shown)}


TSNE_ITERATIONS = 500  # half scikit-learn's default: the layout has settled on flowers5 and it halves the time


def embed_2d(X, *, seed):
    """t-SNE of the rows (after PCA to 50 dimensions), scaled to [0, 1]; (n, 2)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = np.asarray(X, dtype=np.float32)
    if X.shape[1] > 50 and X.shape[0] > 50:
        X = PCA(n_components=50, random_state=seed).fit_transform(X)
    perplexity = float(min(30.0, (len(X) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", max_iter=TSNE_ITERATIONS,
              random_state=seed).fit_transform(X)
    span = np.maximum(xy.max(axis=0) - xy.min(axis=0), 1e-12)
    return (xy - xy.min(axis=0)) / span


# --------------------------------------------------------------------------- charts (inline SVG)


def _svg(fig):
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_chart_svg(rows):
    """CV mean ± std bars in ranking order (best on top), the test accuracy as a dot (and the
    no-leak accuracy when present); SVG text."""
    plt = _pyplot()
    rows = [r for r in ranked(rows) if not (math.isnan(_number(r.get("cv_mean")))
                                            and math.isnan(_number(r.get("test_accuracy"))))][::-1]
    if not rows:
        return None
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "accuracy"}):
        fig, ax = plt.subplots(figsize=(8, 1.1 + 0.26 * len(rows)))
        y = np.arange(len(rows))
        acc = np.array([_number(r.get("test_accuracy")) for r in rows])
        cv_mean = np.array([_number(r.get("cv_mean")) for r in rows])
        cv_std = np.nan_to_num([_number(r.get("cv_std")) for r in rows])
        ax.barh(y, np.nan_to_num(cv_mean), xerr=cv_std, color="#4c72b0", ecolor="#333333", capsize=3,
                label="CV mean ± std (ranks the rows)")
        ax.plot(acc, y, "o", color="#dd8452", ms=4, label="test accuracy (not used to rank)")
        no_leaks = np.array([_number(r.get("test_accuracy_no_leaks")) for r in rows])
        if not np.isnan(no_leaks).all():
            ax.plot(no_leaks, y, "|", color="#c44e52", ms=10, mew=2, label="test accuracy, no leaks")
        ax.set_yticks(y, plain_all(f"{r['features']} / {r['clf']}" for r in rows), fontsize=8)
        values = np.concatenate([acc, cv_mean, no_leaks])
        ax.set_xlim(max(0.0, np.nanmin(values) - 0.05), 1.0)
        ax.set_xlabel("accuracy")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        return _svg(fig)


def learning_curve_svg(rows):
    """Accuracy against training images per class (log scale), one line per feature set and classifier."""
    plt = _pyplot()
    curves = {}
    for r in rows:
        curves.setdefault(f"{r['features']} / {r['clf']}", []).append(
            (_number(r["n_per_class"]), _number(r["accuracy_mean"]), np.nan_to_num(_number(r["accuracy_std"]))))
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "learning"}):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for name, points in sorted(curves.items()):
            n, mean, std = np.array(sorted(points)).T
            ax.plot(n, mean, "o-", ms=3, label=plain(name))
            ax.fill_between(n, mean - std, mean + std, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("training images per class")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _svg(fig)


# --------------------------------------------------------------------------- the page


def report(feature_files=None, *, out=None, limits=None, seed=0):
    """Write the HTML report of a dataset.

    Parameters
    ----------
    feature_files : list of str or Path, optional
        The dataset's feature files (header and map); default: those of the latest extract run.
    out : str or Path, optional
        Default ``models/<dataset>/report.html``.
    limits : Limits, optional
        Images shown per section.
    seed : int
        For the map's sample of non-test rows and t-SNE.

    Returns
    -------
    ReportResult
    """
    from .children import loky_workers_die_with_parent

    with loky_workers_die_with_parent():  # a model's predict may start workers: they die with the report
        return _report(feature_files, out=out, limits=limits or Limits(), seed=seed)


def _report(feature_files, *, out, limits, seed):
    files = resolve_feature_files(feature_files)
    dataset = dataset_name(files[0])
    folder = models_dir_for(files[0])
    out = Path(out) if out else folder / "report.html"
    audit_dir = folder / "audit"
    header = header_section(files, limits=limits)
    thumbs = Thumbnails(header["data_root"], px=limits.thumb_px)
    rows, n_other = results_rows(folder)
    notes = []
    if n_other:
        notes.append(f"{n_other} rows of other feature files (an earlier run) are in results.csv and not shown")
    best = fs = predictions = None
    found = best_model(rows, folder)
    if found:
        try:
            best, fs, predictions = best_section(*found, thumbs, limits=limits, folder=folder)
        except DataError as err:  # its feature files changed or moved since compare
            notes.append(f"the best model's predictions could not be made: {err}")
    elif rows:
        notes.append("no saved scikit-learn model among the results rows; run " + COMPARE_COMMAND)
    if fs is None:
        fs = load_feature_set(files)
    audit = {"duplicates": duplicates_section(audit_dir, thumbs, limits=limits),
             "suspects": suspects_section(audit_dir, thumbs, limits=limits),
             "learning_curve": learning_curve_section(audit_dir),
             "summary": audit_summary(audit_dir), "notes": audit_notes(audit_dir)}
    page = {
        "dataset": dataset,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "header": header,
        "results": results_section(rows),
        "chart_svg": accuracy_chart_svg(rows),
        "best": best,
        "audit": audit,
        "audit_command": AUDIT_COMMAND,
        "compare_command": COMPARE_COMMAND,
        "map": map_section(fs, predictions, thumbs, limits=limits, seed=seed, folder=folder),
        "limits": limits,
        "notes": notes,
        "selection_rule": SELECTION_RULE,
    }
    page["thumbs"] = thumbs.encode()
    page["n_missing_thumbs"] = len(thumbs.ids) - len(page["thumbs"])
    html = render(page)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return ReportResult(path=out, size_bytes=out.stat().st_size, best=best["name"] if best else "",
                        n_thumbnails=len(page["thumbs"]), notes=notes)


def _script_json(value):
    """JSON safe inside a <script> element."""
    return (json.dumps(value, separators=(",", ":"), default=_json_default)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def render(page):
    """The page's HTML from ``templates/report.html``."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    template = env.from_string(resources.files(__package__).joinpath("templates/report.html").read_text("utf-8"))
    best = page["best"]
    data = {"thumbs": page["thumbs"], "map": page["map"],
            "cells": best["cells"] if best else {}, "class_names": page["header"]["class_names"]}
    return template.render(**page, data_json=jinja2.utils.markupsafe.Markup(_script_json(data)),
                           chart=jinja2.utils.markupsafe.Markup(page["chart_svg"] or ""),
                           learning_svg=jinja2.utils.markupsafe.Markup(
                               (page["audit"]["learning_curve"] or {}).get("svg", "")))


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(prog="python -m featurepipe.report",
                      description="One self-contained HTML page (no network needed): results, the best "
                                  "model's mistakes with their images, the audit, a map of the features "
                                  "-> models/<dataset>/report.html.")
    p.add_argument("--features", nargs="+", metavar="F.h5",
                   help="feature files (default: those of the latest extract run)")
    p.add_argument("--out", metavar="PATH", help="where to write the page (default models/<dataset>/report.html)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = report(args.features, out=args.out)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.n_thumbnails} thumbnails)")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
