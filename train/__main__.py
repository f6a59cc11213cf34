"""`python -m train ...` is `specdistill train ...`."""

import sys

from train.cli import run_stage

run_stage("train", sys.argv[1:])
