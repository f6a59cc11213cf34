"""`python -m specdistill.eval ...` is `specdistill eval ...`."""

from specdistill.eval.eval import main

main()
