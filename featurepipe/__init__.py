"""featurepipe: frozen ImageNet CNN features to HDF5, scikit-learn classifiers on top."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the progress bar and summary.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
