"""`python -m specdistill.export ...` is `specdistill export ...`."""

from specdistill.distill.hydra_errors import run_hydra_app
from specdistill.export.export import main

run_hydra_app(main)
