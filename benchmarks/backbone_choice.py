"""Backbone x classifier table for choosing the default backbones: CV on the train rows decides.

    python benchmarks/backbone_choice.py --features /tmp/zoo-features \
        --set squeezenet --set efficientnet_lite2 --set squeezenet+efficientnet_lite0+efficientnet_lite2 \
        --clf svm-rbf [--cost squeezenet=8 --cost efficientnet_lite2=40 ...] [--signed-sqrt] [--out table.md]

Each ``--set`` joins the named feature files of the folder (``NAME.h5``, ``NAME-flip.h5`` for
flip-averaged ones) by path, each block L2-normalised as ``featurepipe.fit`` does; with
``--signed-sqrt`` each block is also passed through sign(x)·sqrt(|x|) and re-normalised. The grid
search (the classifier's default grid, stratified 5 folds, seed 0) sees the train rows only; the
test accuracy of the refitted model is printed beside it, for the record, not for the choice.

With ``--cost NAME=SECONDS`` for every backbone (its extraction time, e.g. measured with
``time featurepipe extract --data DIR --backbone NAME --no-verify --overwrite``), a set costs the
sum of its backbones, and the rule the default follows is applied and printed: per classifier, the
cheapest set whose CV mean is within one standard error (fold std / sqrt(folds)) of the best CV
mean of all sets.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from featurepipe.classifiers import get_classifier
from featurepipe.fit import _split_rows, l2_normalize, load_feature_set, search

FOLDS = 5


def signed_sqrt_blocks(X, dims):
    """sign(x)·sqrt(|x|) of every block, each re-L2-normalised; (n, sum dims) float32."""
    starts = np.cumsum([0, *dims])
    return np.hstack([l2_normalize(np.sign(X[:, a:b]) * np.sqrt(np.abs(X[:, a:b])))
                      for a, b in zip(starts[:-1], starts[1:])])


def measure(folder, name, clf, *, signed_sqrt=False, cv=FOLDS, seed=0, n_jobs=-1):
    """One row: cv mean/std on the train rows, test accuracy of the refitted model, seconds."""
    fs = load_feature_set([Path(folder) / f"{stem}.h5" for stem in name.split("+")])
    X = signed_sqrt_blocks(fs.X, [b["dim"] for b in fs.blocks]) if signed_sqrt else fs.X
    train, test = _split_rows(fs)
    spec = get_classifier(clf)
    started = time.perf_counter()
    found = search(X=X[train], y=fs.y[train], pipeline=spec.make(n_samples=len(train), n_features=X.shape[1],
                                                                 seed=seed),
                   grid=spec.grid, cv=cv, n_jobs=n_jobs, seed=seed)
    test_accuracy = float((found["model"].predict(X[test]) == fs.y[test]).mean())
    return dict(set=name, features=name + (" (signed sqrt)" if signed_sqrt else ""), clf=clf,
                cv_mean=found["cv_mean"], cv_std=found["cv_std"], test=test_accuracy,
                seconds=time.perf_counter() - started, params=found["best_params"])


def one_se_choice(rows, costs):
    """The cheapest row whose CV mean is within one standard error of the best row's."""
    best = max(rows, key=lambda r: r["cv_mean"])
    floor = best["cv_mean"] - best["cv_std"] / math.sqrt(FOLDS)
    near = [r for r in rows if r["cv_mean"] >= floor]
    return min(near, key=lambda r: (set_cost(r["set"], costs), -r["cv_mean"])), floor


def set_cost(name, costs):
    return sum(costs[stem] for stem in name.split("+"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", required=True, help="folder of feature files")
    p.add_argument("--set", action="append", required=True, help="NAME or NAME+NAME+... (file stems)")
    p.add_argument("--clf", action="append", default=None, help="classifier (default: logreg, svm-rbf)")
    p.add_argument("--cost", action="append", default=[], metavar="NAME=SECONDS",
                   help="extraction seconds of one backbone (all of them: apply the one-SE rule)")
    p.add_argument("--signed-sqrt", action="store_true", help="also measure every set with signed sqrt")
    p.add_argument("--out", help="append the Markdown rows to this file")
    args = p.parse_args(argv)
    costs = {k: float(v) for k, v in (c.split("=") for c in args.cost)}
    rows = []
    cost_column = " extraction s |" if costs else ""
    print(f"| features | clf | CV (train, {FOLDS} folds) | test |{cost_column} fit s |\n"
          f"|---|---|---|---|{'---|' if costs else ''}---|", flush=True)
    for name in args.set:
        for clf in args.clf or ["logreg", "svm-rbf"]:
            for sq in ([False, True] if args.signed_sqrt else [False]):
                r = measure(args.features, name, clf, signed_sqrt=sq)
                cost = f" {set_cost(name, costs):.0f} |" if costs else ""
                line = (f"| {r['features']} | {r['clf']} | {r['cv_mean']:.4f} ± {r['cv_std']:.4f} | "
                        f"{r['test']:.4f} |{cost} {r['seconds']:.0f} |")
                print(line, flush=True)
                rows.append(r)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(line + "\n")
    if costs:
        for clf in dict.fromkeys(r["clf"] for r in rows):
            plain = [r for r in rows if r["clf"] == clf and r["features"] == r["set"]]
            choice, floor = one_se_choice(plain, costs)
            print(f"{clf}: cheapest set with CV >= {floor:.4f} (best CV minus one standard error): "
                  f"{choice['set']} (CV {choice['cv_mean']:.4f}, {set_cost(choice['set'], costs):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
