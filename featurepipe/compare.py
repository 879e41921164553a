"""Compare every classifier on every feature file and on their concatenation.

``compare(...)`` fits each (feature set, classifier) pair with ``featurepipe.fit.fit`` — reusing
rows already computed from the same inputs, classifier, grid and folds unless ``force`` — and
writes ``models/<dataset>/results.csv``, ``results.md`` (ranked by CV on the training rows:
``featurepipe.results.ranked``), ``results.png`` (CV mean ± std bars in that order, test accuracy
as dots) and ``confusion.png`` (the best row by CV). Fine-tuned models saved by ``featurepipe.finetune`` (``<backbone>__finetune.json``) join
the table as rows of their own.

Every row is planned before the first fit (``plan_rows``: peak memory and rough time from the
shapes, ``featurepipe.budget``): a row that cannot fit refuses the whole run in one line, and a
big plan is printed. The feature sets are read one at a time.
"""

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from .cli import OneLineParser
from .classifiers import CLASSIFIERS, DEFAULT_CLASSIFIERS, get_classifier, parse_grid
from .checks import check_at_least, check_n_jobs, check_seed
from .errors import UsageError
from .budget import announce, check_plans
from .fit import (add_common_arguments, feature_set_header, fit, model_stem, plan_row, read_features,
                  resolve_feature_files)
from .paths import models_dir_for
from .plotting import plain, plain_all
from .results import best_row, can_be_chosen, models_folder_lock, current_rows, finetune_rows, number, ranked, results_markdown, update_results


def feature_sets(files, *, concat=True):
    """Each file alone, then all of them joined (when there are several): headers only (``X`` is
    None; ``featurepipe.fit.read_features`` reads one set's matrix when its rows are fitted)."""
    files = [Path(f) for f in files]
    sets = [feature_set_header([f]) for f in files]
    if concat and len(files) > 1:
        sets.append(feature_set_header(files))
    return sets


def plan_rows(sets, specs, *, cv, grid, full, n_jobs, dask):
    """Every row's ``budget.RowPlan``, in fitting order, from the headers' shapes alone."""
    from .classifiers import fit_grid

    plans = []
    for fs in sets:
        n_train = int(np.isin(fs.split, ("train", "val")).sum())
        folds = max(2, min(cv, _smallest_class(fs)))
        for spec in specs:
            g = spec.grid_for(full, n_samples=n_train, n_features=fs.n_features) if grid is None else dict(grid)
            g = fit_grid(g, n_samples=n_train * (folds - 1) // folds, n_features=fs.n_features)
            plans.append(plan_row(fs, spec, cv=folds, grid=g, n_jobs=n_jobs, dask=dask,
                                  input_bytes=4.0 * len(fs.paths) * fs.n_features, train_view=True))
    return plans


def _smallest_class(fs):
    y = fs.y[np.isin(fs.split, ("train", "val"))]
    counts = np.bincount(y) if len(y) else np.zeros(1, int)
    return int(counts[counts > 0].min()) if (counts > 0).any() else 2


def compare(feature_files=None, clfs=None, *, full=False, cv=5, grid=None, n_jobs=-1, seed=0,
            max_seconds=None, dask=None, force=False, concat=True, quiet=True, plots=True, finetune=(),
            report=True):
    """Fit every classifier on every feature set; write the results table and plots.

    Parameters
    ----------
    feature_files : list of str or Path, optional
        Default: the files of the latest extract run.
    clfs : list of (str or estimator), optional
        Registry names, ``package.module:ClassName`` strings or estimator instances; default
        ``DEFAULT_CLASSIFIERS`` (every entry of ``CLASSIFIERS`` with ``full``).
    full : bool
        The exhaustive sweep: every registry classifier (unless ``clfs`` is given), each with its
        wider grid (``ClassifierSpec.full_grid``).
    cv, grid, n_jobs, seed, max_seconds, dask
        As for ``featurepipe.fit.fit`` (``grid`` applies to every classifier).
    force : bool
        Refit rows that could be reused.
    concat : bool
        Add the concatenation of all files as a feature set.
    quiet : bool
        No progress bar.
    finetune : list of str
        Backbones to fine-tune (``featurepipe.finetune.finetune`` on their feature file) when no
        fine-tuned model exists for them yet; their rows join the table.
    report : bool
        Also write ``report.html`` (``featurepipe.report``); a failure there is a warning.

    Returns
    -------
    list of dict
        The rows of this run and the fine-tuned rows, ranked (best CV first; test accuracy
        never decides).
    """
    check_seed(seed)
    check_at_least(cv, 2, "--cv")
    check_n_jobs(n_jobs)
    files = resolve_feature_files(feature_files)
    clfs = list(clfs) if clfs else list(CLASSIFIERS if full else DEFAULT_CLASSIFIERS)
    specs = [get_classifier(clf) for clf in clfs]  # an unknown name fails before any fit
    sets = feature_sets(files, concat=concat)
    plans = plan_rows(sets, specs, cv=cv, grid=grid, full=full, n_jobs=n_jobs, dask=dask)
    check_plans(plans, dask=dask)  # every row planned: a row that cannot fit refuses before any fit
    if not quiet:
        announce(plans)
    folder = models_dir_for(files[0], claim=True)
    with models_folder_lock(folder):  # one compare at a time per folder: rows name their own models
        return _compare_locked(files, clfs, sets, plans, folder, full=full, cv=cv, grid=grid, n_jobs=n_jobs, seed=seed,
                               max_seconds=max_seconds, dask=dask, force=force, quiet=quiet, plots=plots,
                               finetune=finetune, report=report)


def _compare_locked(files, clfs, sets, plans, folder, *, full, cv, grid, n_jobs, seed, max_seconds, dask, force,
                    quiet, plots, finetune, report):
    rows = []
    plan_of = iter(plans)
    with _dask_session(dask), _progress(len(sets) * len(clfs), quiet) as bar:
        for header in sets:
            fs = read_features(header, train_first=True)  # one set's matrix at a time
            for clf in clfs:
                bar.set_postfix_str(f"{fs.name} / {clf if isinstance(clf, str) else type(clf).__name__}")
                result = fit(clf=clf, cv=cv, grid=grid, full_grid=full, n_jobs=n_jobs, seed=seed,
                             max_seconds=max_seconds, dask=dask, reuse=not force, feature_set=fs,
                             planned=next(plan_of))
                if not result.status.startswith("ok"):
                    print(f"{fs.name} / {result.clf}: {result.status}", file=sys.stderr)
                rows.append(result.row())
                bar.update(1)
            del fs
    _finetune_missing(finetune, files, folder, seed=seed, quiet=quiet)
    rows += finetune_rows(folder)
    table = update_results(folder, rows, features=files)
    if plots:
        current = current_rows(table, folder)
        plot_results(current, folder / "results.png", title=sets[0].dataset)
        plot_best_confusion(current, folder)
    if report:
        _write_report(files)
    mine = {(r["features"], r["clf"]) for r in rows}
    return [r for r in table if (r["features"], r["clf"]) in mine]


def _write_report(files):
    from .report import report

    from .modelfile import ModelRefused

    try:
        report(files)
    except ModelRefused:
        raise
    except Exception as err:  # the table is written; a report problem must not fail the run
        warnings.warn(f"report.html not written: {err}", stacklevel=3)


def _progress(total, quiet):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", unit="row", disable=quiet or None, file=sys.stderr,
                dynamic_ncols=True)


def _dask_session(dask):
    """One cluster for all rows (``fit`` reuses the open session for the same address)."""
    if not dask:
        return contextlib.nullcontext()
    from .distributed import session

    return session(dask)


def _finetune_missing(backbones, files, folder, *, seed, quiet):
    """Fine-tune each backbone in ``backbones`` that has no saved fine-tuned model yet."""
    if not backbones:
        return
    from .finetune import finetune, output_paths
    from .store import read_attrs

    by_backbone = {str(read_attrs(f).get("backbone")): f for f in files}
    for backbone in backbones:
        if backbone not in by_backbone:
            raise UsageError(f"--finetune {backbone}: no feature file of that backbone among "
                             f"{', '.join(sorted(by_backbone))}")
        if not output_paths(by_backbone[backbone], folder.parent)[1].exists():
            finetune(backbone=backbone, features=by_backbone[backbone], models_dir=folder.parent,
                     seed=seed, quiet=quiet)


def plot_results(rows, path, *, title=""):
    """Horizontal bars of CV mean ± std per row in ranking order (best on top), the test accuracy
    as a dot beside each; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ranked(rows) if not math.isnan(number(r.get("cv_mean")))
            or not math.isnan(number(r.get("test_accuracy")))][::-1]
    if not rows:
        return None
    labels = plain_all(f"{r['features']} / {r['clf']}" for r in rows)
    acc = [number(r.get("test_accuracy")) for r in rows]
    cv_mean = [number(r.get("cv_mean")) for r in rows]
    cv_std = [0.0 if math.isnan(number(r.get("cv_std"))) else number(r.get("cv_std")) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(rows)))
    y = range(len(rows))
    ax.barh(y, [0.0 if math.isnan(v) else v for v in cv_mean], xerr=cv_std, color="#4c72b0",
            ecolor="#333333", capsize=3, label="CV mean ± std (ranks the rows)")
    ax.plot(acc, list(y), "o", color="#dd8452", ms=4, label="test accuracy (not used to rank)")
    ax.set_yticks(list(y), labels, fontsize=8)
    low = min([a for a in acc + cv_mean if not math.isnan(a)])
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("accuracy")
    ax.set_title(plain(f"{title}: classifiers × features".strip(": ")))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_best_confusion(rows, folder, *, path=None):
    """``confusion.png`` of the best row by CV (``ranked``) that has a saved confusion matrix;
    its path or None."""
    for r in ranked(rows):
        if not can_be_chosen(r):
            continue
        stem = model_stem(r["features"], r["clf"])
        try:
            saved = json.loads((Path(folder) / f"{stem}.json").read_text())
        except (OSError, ValueError):
            continue
        if saved.get("confusion") and saved.get("class_names"):
            return plot_confusion(saved["confusion"], saved["class_names"], path or Path(folder) / "confusion.png",
                                  title=f"{r['features']} / {r['clf']} (best by CV {number(r['cv_mean']):.4f})\n"
                                        f"test accuracy {number(r.get('test_accuracy')):.4f}")
    return None


def plot_confusion(matrix, class_names, path, *, title=""):
    """A confusion-matrix PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * n, 2 + 0.6 * n))
    ax.imshow(m, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(n), plain_all(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), plain_all(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(plain(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = OneLineParser(prog="python -m featurepipe.compare",
                                description="The default classifiers (every one with --all) x every feature file (and their "
                                            "concatenation), ranked by CV on the training rows "
                                            "-> models/<dataset>/results.csv, results.md, results.png, confusion.png.")
    p.add_argument("--clf", nargs="+", metavar="NAME",
                   help=f"classifiers (default: {', '.join(DEFAULT_CLASSIFIERS)}; with --all: "
                        f"{', '.join(CLASSIFIERS)}); package.module:ClassName too")
    p.add_argument("--all", action="store_true",
                   help="the exhaustive sweep: every classifier, each with its wider grid")
    add_common_arguments(p)
    p.add_argument("--no-concat", action="store_true", help="skip the concatenation of all feature files")
    p.add_argument("--force", action="store_true", help="refit rows that could be reused")
    p.add_argument("--finetune", action="append", default=[], metavar="BACKBONE",
                   help="also fine-tune BACKBONE (two-stage, see featurepipe.finetune) when no "
                        "fine-tuned model exists yet, and show its row (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else None
    rows = compare(args.features, args.clf, full=args.all, cv=args.cv, grid=grid, n_jobs=args.n_jobs, seed=args.seed,
                   max_seconds=args.max_seconds, dask=args.dask, force=args.force,
                   concat=not args.no_concat, quiet=args.quiet, finetune=args.finetune)
    print(results_markdown(rows), end="")
    best = best_row(rows)
    if best is not None:
        print(best_line(best))
    if rows:
        folder = models_dir_for(resolve_feature_files(args.features)[0])
        print(f"-> {folder / 'results.md'}, results.csv, results.png, confusion.png")
        if (folder / "report.html").is_file():
            print(f"report: {folder / 'report.html'}")
    return 0


def best_line(row):
    """One line naming the best row by CV, with its test accuracy for the record."""
    test = number(row.get("test_accuracy"))
    scored = ("no test rows" if math.isnan(test)
              else f"test accuracy {test:.4f}, measured once, not used to choose")
    return (f"best by CV: {row['features']} / {row['clf']} (CV {number(row['cv_mean']):.4f} ± "
            f"{number(row['cv_std']):.4f} on the training rows; {scored})")



if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
