"""Helpers shared by the ``python -m featurepipe.<stage>`` entry points."""

import argparse
import os
import sys
import warnings

from .errors import FeaturepipeError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one ``error: ...`` line on stderr (exit code 2), no usage dump.

    Every list option takes both forms, ``--clf a b`` and ``--clf a --clf b`` (and mixed): an
    option declared with ``nargs="+"``/``"*"`` or ``action="append"`` collects every value of
    every occurrence (``action="extend"``), so a repeat is never silently dropped.
    """

    def add_argument(self, *args, **kwargs):
        if args and str(args[0]).startswith("-") and kwargs.get("action") in (None, "store", "append"):
            if kwargs.get("nargs") in ("+", "*"):
                kwargs["action"] = "extend"
            elif kwargs.get("action") == "append" and "nargs" not in kwargs:
                kwargs.update(action="extend", nargs="+")
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def warn_line(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the CLIs: one ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def run_main(func, argv=None):
    """Call ``func(argv)`` with every warning printed as one ``warning: ...`` line; turn a
    FeaturepipeError into one stderr line and exit code 2."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = warn_line
            return func(argv) or 0
    except FeaturepipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume",
              file=sys.stderr)
        return 130
