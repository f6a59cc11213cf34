"""`python -m specdistill.data_prep ...` is `specdistill prep ...`."""

from specdistill.data_prep.prep import main

main()
