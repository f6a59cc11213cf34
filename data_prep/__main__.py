"""`python -m specdistill.data_prep ...` is `specdistill prep ...`."""

from specdistill.data_prep.prep import main
from specdistill.distill.hydra_errors import run_hydra_app

run_hydra_app(main)
