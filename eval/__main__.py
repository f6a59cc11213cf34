"""`python -m specdistill.eval ...` is `specdistill eval ...`."""

from specdistill.distill.hydra_errors import run_hydra_app
from specdistill.eval.eval import main

run_hydra_app(main)
