"""``python -m featurepipe.finetune``."""

import sys

from ..cli import run_main
from .cli import main

sys.exit(run_main(main))
