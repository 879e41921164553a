"""Worker processes that never outlive the process that started them.

A ``kill -9`` of compare or fit cannot run any clean-up code, so the workers are told by the
kernel instead: each one asks Linux (``prctl(PR_SET_PDEATHSIG)``) for SIGKILL when its parent
dies. Elsewhere it is a no-op and the workers end after their current task.
"""

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid=None):
    """Call first thing in a child process (e.g. as a pool ``initializer``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def loky_workers_die_with_parent():
    """A joblib config: the loky workers of grid searches started inside it die with this process."""
    import joblib

    return joblib.parallel_config(backend="loky", initializer=die_with_parent, initargs=(os.getpid(),))
