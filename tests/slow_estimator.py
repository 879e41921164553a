"""A classifier whose fit writes a marker named by its process id, then waits (for the kill test)."""

import os
import time
from pathlib import Path

from sklearn.base import BaseEstimator, ClassifierMixin


class MarkedSlowClassifier(ClassifierMixin, BaseEstimator):
    def __init__(self, C=1.0):
        self.C = C

    def fit(self, X, y):
        Path(os.environ["SLOW_MARKERS"], str(os.getpid())).touch()
        time.sleep(120)  # the test kills the parent long before; a worker left alive shows here
        return self

    def predict_proba(self, X):  # never reached: the audit's kill test kills the parent during fit
        raise NotImplementedError

    def predict(self, X):  # likewise
        raise NotImplementedError
