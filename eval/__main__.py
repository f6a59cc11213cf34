"""`python -m eval ...` is `specdistill eval ...`."""

from eval.eval import main

main()
