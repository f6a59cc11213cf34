"""`python -m specdistill.cli <command> ...` is `specdistill <command> ...`."""

from specdistill.cli.main import main

main()
