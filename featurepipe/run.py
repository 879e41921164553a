"""The whole job on one data set: extract -> compare -> audit -> report, in one call.

``run(data, ...)`` chains the stages with their defaults and returns a ``RunResult``;
``featurepipe run --data DIR`` only parses arguments and prints where everything went. Every stage
reuses what is finished (feature files are extended, results rows whose inputs did not change are
kept, an audit of the same inputs is read back), so a second run only does what is new, and a run
stopped at any moment is resumed by running it again.

Outputs never land inside the image folder: feature files go to ``default_out_dir`` (or ``out``),
models, results, the audit and the report to ``models/<dataset>/``.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import OneLineParser
from .errors import UsageError

# The exhaustive sweep (--all): every backbone with offline weights, every classifier, full grids.
ALL_BACKBONES = ("squeezenet", "mobilenet", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2")
TOP_ROWS = 5


@dataclass(frozen=True)
class RunResult:
    """Where one run put everything, and what it found.

    Attributes
    ----------
    features : list of Path
        One feature file per backbone.
    models_dir : Path
        ``models/<dataset>/``: one ``.skops`` per row, ``results.csv``, ``results.md``, plots.
    rows : list of dict
        The results rows, ranked (best CV first).
    best : dict or None
        The best row by CV (``featurepipe.results.best_row``).
    audit_dir : Path or None
    report : Path or None
    seconds : dict of str to float
        Wall time per stage.
    """

    features: list
    models_dir: Path
    rows: list
    best: dict = None
    audit_dir: Path = None
    report: Path = None
    seconds: dict = field(default_factory=dict)

    def summary(self, top=TOP_ROWS):
        from .compare import best_line
        from .results import results_markdown

        lines = [results_markdown(self.rows, limit=top).rstrip("\n")]
        if self.best is not None:
            lines.append(best_line(self.best))
        lines.append("")
        lines.append(f"features: {', '.join(str(Path(p).resolve()) for p in self.features)}")
        lines.append(f"models and results: {self.models_dir.resolve()}/ (results.md, results.csv, *.skops)")
        if self.audit_dir is not None:
            lines.append(f"audit: {self.audit_dir.resolve()}/")
        if self.report is not None:
            lines.append(f"report: {self.report.resolve()}")
        lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def run(data, *, backbones=None, clfs=None, full=False, out=None, audit=True, report=True, cv=5,
        seed=0, test_size=0.2, val_size=0.0, engine="auto", preprocess=None, allow_outside=False,
        n_jobs=-1, quiet=False):
    """Extract, compare, audit and report one data set with the defaults.

    Parameters
    ----------
    data : str or Path
        A folder of class folders (optionally below ``train/val/test``) or a CSV manifest.
    backbones : list of str, optional
        Default ``featurepipe.extract.DEFAULT_BACKBONES`` (``ALL_BACKBONES`` with ``full``).
    clfs : list of str, optional
        Default ``featurepipe.classifiers.DEFAULT_CLASSIFIERS`` (every one with ``full``).
    full : bool
        The exhaustive sweep: every offline backbone, every classifier, each with its full grid.
    out : str or Path, optional
        The feature files' folder (default ``featurepipe.paths.default_out_dir``).
    audit, report : bool
        Run the audit; write the HTML report.
    cv, seed, test_size, val_size, engine, preprocess, allow_outside, n_jobs
        As for ``extract`` and ``compare`` (``preprocess``: for ``file:`` models).
    quiet : bool
        No progress bars or stage lines.

    Returns
    -------
    RunResult
    """
    from .audit import audit as run_audit
    from .compare import compare
    from .extract import DEFAULT_BACKBONES, extract
    from .paths import models_dir_for
    from .results import best_row

    backbones = list(backbones or (ALL_BACKBONES if full else DEFAULT_BACKBONES))
    _check_before_work(data, out, backbones=backbones, clfs=clfs, cv=cv, n_jobs=n_jobs, seed=seed,
                       preprocess=preprocess, allow_outside=allow_outside, test_size=test_size,
                       val_size=val_size)
    seconds = {}
    say = (lambda msg: None) if quiet else (lambda msg: print(f"==> {msg}", file=sys.stderr, flush=True))

    say(f"extract: {' '.join(backbones)}")
    started = time.perf_counter()
    extracted = extract(data, backbones, out=out, seed=seed, test_size=test_size, val_size=val_size,
                        engine=engine, preprocess=preprocess, allow_outside=allow_outside, quiet=quiet)
    files = [r.path for r in extracted]
    seconds["extract"] = time.perf_counter() - started
    models_dir = models_dir_for(files[0])

    say(f"compare: {', '.join(clfs) if clfs else ('every classifier, full grids' if full else 'default classifiers')}")
    started = time.perf_counter()
    rows = compare(files, clfs, full=full, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet, report=False)
    seconds["compare"] = time.perf_counter() - started

    audit_dir = None
    if audit:
        say("audit: near-duplicates, label suspects, learning curve")
        started = time.perf_counter()
        audit_dir = run_audit(files, seed=seed, n_jobs=n_jobs, quiet=quiet, reuse=True).folder
        seconds["audit"] = time.perf_counter() - started

    report_path = None
    if report:
        from .report import report as write_report

        say("report")
        started = time.perf_counter()
        report_path = write_report(files, seed=seed).path
        seconds["report"] = time.perf_counter() - started

    from .results import current_rows, read_results

    table = current_rows(read_results(models_dir), models_dir)  # results.csv's order: ranked
    return RunResult(features=files, models_dir=models_dir, rows=table or rows, best=best_row(table),
                     audit_dir=audit_dir, report=report_path, seconds=seconds)


def _check_before_work(data, out, *, backbones, clfs, cv, n_jobs, seed, preprocess, allow_outside, test_size,
                       val_size):
    """Every refusal that does not need the features, before any is extracted: the arguments,
    the layout (two classes at least), and where the outputs and the models would go."""
    from .backbones import get_backbone
    from .checks import check_at_least, check_n_jobs, check_seed
    from .classifiers import get_classifier
    from .errors import DataError
    from .extract import outputs_and_images
    from .images import check_class_sizes, check_data
    from .paths import check_outside_input, models_dir_for

    check_data(data)
    check_at_least(cv, 2, "--cv")
    check_n_jobs(n_jobs)
    check_seed(seed)
    for clf in clfs or ():
        get_classifier(clf)
    for name in backbones:
        get_backbone(name, preprocess_mode=preprocess)
    out_dir, index = outputs_and_images(data, out, allow_outside=allow_outside)
    if len(set(index.labels.tolist())) < 2:
        raise DataError(f"'{data}' holds images of {len(set(index.labels.tolist()))} class; a classifier "
                        "needs two or more class folders (or labels)")
    check_class_sizes(index, test_size=test_size, val_size=val_size)
    models_dir = models_dir_for(Path(out_dir) / "features.h5")  # refuses another data set's folder
    for images in [Path(data)] if Path(data).is_dir() else index.images_folders():
        check_outside_input(images, models_dir, "the models folder (FEATUREPIPE_MODELS)")


# --------------------------------------------------------------------------- CLI


def build_parser():
    from .classifiers import DEFAULT_CLASSIFIERS
    from .extract import DEFAULT_BACKBONES

    p = OneLineParser(prog="featurepipe run",
                      description="The whole job on one image folder: features, the classifier comparison, "
                                  "the audit and the HTML report. Run it again to resume or to add new images.")
    p.add_argument("--data", help="folder of class folders (optionally under train/val/test) or a CSV "
                                  "manifest path,label[,split]")
    p.add_argument("--backbone", action="append", metavar="NAME",
                   help=f"backbone (repeatable; default: {' '.join(DEFAULT_BACKBONES)}; see "
                        "featurepipe extract --list-backbones)")
    p.add_argument("--clf", action="append", metavar="NAME",
                   help=f"classifier (repeatable; default: {' '.join(DEFAULT_CLASSIFIERS)})")
    p.add_argument("--all", action="store_true",
                   help="the exhaustive sweep: every offline backbone, every classifier, full grids")
    p.add_argument("--out", help="folder of the feature files (default data/features/<dataset>, or "
                                 "featurepipe-out/<dataset> when that would be inside DATA)")
    p.add_argument("--allow-outside", action="store_true",
                   help="read CSV manifest rows naming files outside the manifest's folder")
    p.add_argument("--no-audit", action="store_true", help="skip the audit")
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=float, default=0.2, help="test fraction when the layout gives no split")
    p.add_argument("--val-size", type=float, default=0.0)
    p.add_argument("--engine", default="auto", help="forward-pass engine (see featurepipe extract --help)")
    p.add_argument("--preprocess", help="preprocessing of a file: model (see featurepipe extract --help)")
    p.add_argument("--n-jobs", type=int, default=-1, help="parallel fits (default -1: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.data:
        raise UsageError("--data is required: a folder of class folders (or train/val/test folders) "
                         "or a CSV manifest")
    result = run(args.data, backbones=args.backbone, clfs=args.clf, full=args.all, out=args.out,
                 audit=not args.no_audit, cv=args.cv, seed=args.seed, test_size=args.test_size,
                 val_size=args.val_size, engine=args.engine, preprocess=args.preprocess,
                 allow_outside=args.allow_outside, n_jobs=args.n_jobs, quiet=args.quiet)
    print(result.summary())
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
