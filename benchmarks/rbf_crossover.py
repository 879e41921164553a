"""Where the exact RBF SVM stops paying: exact kernel vs the Nystroem row by training rows.

    python benchmarks/rbf_crossover.py --rows 2000 4000 8000 12000 16000 --out /tmp/rbf-crossover

Data: ``benchmarks/scale.py``'s synthetic feature files (the 3 default backbones' widths, 100
overlapping classes, 2 % wrong labels), joined and L2-normalised per block as ``compare`` reads
them (``featurepipe.fit.load_feature_set``). For every size N, a stratified sample of N training
rows; both variants are the registry's ``svm-rbf`` pipeline built for N rows with the switch
forced (``FEATUREPIPE_EXACT_RBF_MAX_ROWS``): the exact kernel SVM with C 10 and the Nystroem 2048
+ ridge with alpha 0.03 (the values each default grid chooses on these data and on flowers5).
Each (variant, N) runs in a fresh process: 3-fold stratified CV (seed 0), one fit per fold, as
one grid point of ``compare``'s search (the sigmoid calibration ``compare`` adds to the refit of
either variant is not part of it). Reported: mean CV accuracy, seconds per fold
(fit + scoring the held-out third) and the process's peak RSS. Prints a Markdown table and saves
it under ``--out``.
"""

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

VARIANTS = {"exact": ("1000000000", {"clf__C": 10.0}), "nystroem 2048": ("1", {"clf__alpha": 0.03})}


def one_measurement(files, n_rows, variant, seed=0):
    """(mean CV accuracy, seconds per fold, peak RSS GB) of ``variant`` on ``n_rows`` training rows."""
    os.environ["FEATUREPIPE_EXACT_RBF_MAX_ROWS"] = VARIANTS[variant][0]
    from sklearn.model_selection import StratifiedKFold, cross_validate, train_test_split

    from featurepipe.classifiers import CLASSIFIERS
    from featurepipe.fit import load_feature_set

    fs = load_feature_set(files)
    train = np.flatnonzero(fs.split == "train")
    rows, _ = train_test_split(train, train_size=n_rows, stratify=fs.y[train], random_state=seed)
    X, y = fs.X[np.sort(rows)], fs.y[np.sort(rows)]
    del fs
    pipeline = CLASSIFIERS["svm-rbf"].make(n_samples=len(y), n_features=X.shape[1], seed=seed)
    pipeline.set_params(**VARIANTS[variant][1])
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    started = time.perf_counter()
    scores = cross_validate(pipeline, X, y, cv=folds, n_jobs=1)["test_score"]
    seconds = (time.perf_counter() - started) / 3
    return float(scores.mean()), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 4000, 8000, 12000, 16000])
    p.add_argument("--out", default="/tmp/rbf-crossover")
    p.add_argument("--classes", type=int, default=100)
    args = p.parse_args()
    from scale import BACKBONE_DIMS, write_feature_files

    out = Path(args.out)
    folder = out / "features"
    files = [folder / f"{b}.h5" for b in BACKBONE_DIMS]
    total = int(max(args.rows) / 0.8 * 1.1) + 1  # the test share is not used: only training rows
    marker = folder / ".complete.json"
    want = {"rows": total, "classes": args.classes}
    if not (marker.exists() and json.loads(marker.read_text()) == want and all(f.exists() for f in files)):
        write_feature_files(folder, n_rows=total, n_classes=args.classes, backbones=list(BACKBONE_DIMS))
        marker.write_text(json.dumps(want))
    lines = [f"`python benchmarks/rbf_crossover.py {' '.join(sys.argv[1:])}` — {os.cpu_count()} cores, "
             f"3 backbones joined ({sum(BACKBONE_DIMS.values())} dims), {args.classes} classes, 3-fold CV",
             "", "| training rows | variant | CV accuracy | s per fold | peak RSS GB |", "|---:|---|---:|---:|---:|"]
    for n in args.rows:
        for variant in VARIANTS:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                acc, sec, rss = pool.submit(one_measurement, files, n, variant).result()
            lines.append(f"| {n:,} | {variant} | {acc:.4f} | {sec:.1f} | {rss:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + f"\n\nload average at the end: {os.getloadavg()[0]:.1f}\n"
    print(table)
    path = out / f"rbf-crossover-{datetime.now():%Y%m%d-%H%M}.md"
    path.write_text(table)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
