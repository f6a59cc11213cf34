"""`python -m specdistill.train ...` is `specdistill train ...`."""

import sys

from specdistill.train.cli import run_stage

run_stage("train", sys.argv[1:])
