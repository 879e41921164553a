"""A classifier whose fit SIGKILLs its own process, as the kernel's OOM killer would (for the
killed-worker test). It refuses to do so in the process that built it (the test runner)."""

import os
import signal

from sklearn.base import BaseEstimator, ClassifierMixin


class SelfKillingClassifier(ClassifierMixin, BaseEstimator):
    def __init__(self, *, parent_pid=0):
        self.parent_pid = parent_pid

    def fit(self, X, y):
        if os.getpid() == self.parent_pid:
            raise RuntimeError("refusing to kill the test runner: fit must run in a worker process")
        os.kill(os.getpid(), signal.SIGKILL)
        return self
