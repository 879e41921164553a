"""Fine-tuned baseline (a subpackage: ``data`` rows/images/settings, ``model`` the network and
its loading (``featurepipe.predict`` classifies with it), ``train`` the two stages, ``cli``): a new head on a backbone, then its top layers trained with a low rate.

Two stages, on exactly the split stored in the backbone's feature file (so the test accuracy sits
beside the frozen-feature rows of the results table):

1. **Head** (``Dropout`` + ``Dense`` softmax, Adam) trained on the file's cached features: seconds.
2. **Fine-tuning**: the live network (uint8 RGB images -> the file's preprocessing -> backbone ->
   pooling -> the stage-1 head) with its top layers unfrozen, SGD with momentum 0.9 at a low rate,
   light augmentation (flip, small rotation and zoom), early stopping on the val rows and the best
   epoch kept. Every BatchNormalization layer stays frozen, in inference mode (the shared MobileNet
   weights have their batch norm folded into the convolutions; batch statistics would wreck them).

Each epoch is checkpointed (model and optimizer state) under ``models/<dataset>/.<name>__finetune.work/``;
a killed run started again with the same settings resumes after the last finished epoch.

Writes ``models/<dataset>/<name>__finetune.keras`` (a plain Keras model: RGB 0..255 float input of
shape (n, S, S, 3), class probabilities out; loads with ``keras.models.load_model`` and no custom
objects) and ``<name>__finetune.json`` (a row of the comparison table plus metadata).
"""

from .data import output_paths
from .model import DEFAULT_UNFREEZE, base_of, build_finetune_model, load_finetuned, set_trainable
from .train import FinetuneResult, finetune
from .cli import build_parser, main

__all__ = ["DEFAULT_UNFREEZE", "FinetuneResult", "base_of", "build_finetune_model", "build_parser",
           "finetune", "main", "load_finetuned", "output_paths", "set_trainable"]
