"""``featurepipe <stage> ...``: one command for every stage (``python -m featurepipe`` too).

Each stage is its own module with ``main(argv) -> int``; ``python -m featurepipe.<stage>`` keeps
working. Stage modules are imported only when run, so ``featurepipe --help`` starts fast.
"""

import importlib
import sys

from .cli import run_main

# stage name -> (module, one line for --help); a new stage is one entry here.
STAGES = {
    "run": ("featurepipe.run", "the whole job on an image folder: extract, compare, audit, report"),
    "extract": ("featurepipe.extract", "image folder -> one HDF5 feature file per backbone"),
    "fit": ("featurepipe.fit", "grid-search one classifier on feature files"),
    "compare": ("featurepipe.compare", "classifiers x feature sets -> results table ranked by CV"),
    "predict": ("featurepipe.predict", "label image files with a saved model"),
    "export": ("featurepipe.export", "a saved model as one TFLite/SavedModel file: pixels in, classes out"),
    "verify": ("featurepipe.verify", "re-extract rows of a feature file and compare"),
    "audit": ("featurepipe.audit", "near-duplicates, leaks, label suspects, learning curve"),
    "report": ("featurepipe.report", "one self-contained HTML page of results and audit"),
    "finetune": ("featurepipe.finetune", "fine-tuned network as a comparison row"),
    "datasets": ("featurepipe.datasets", "download a public dataset (online only)"),
}


def usage():
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in STAGES.items()]
    return ("usage: featurepipe <stage> [options]   (featurepipe <stage> --help for its options)\n\n"
            "stages:\n" + "\n".join(lines) + "\n")


def main(argv=None):
    """Run ``featurepipe <stage> [options]``; return the stage's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; choose one of: {', '.join(STAGES)} "
              "(see featurepipe --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
