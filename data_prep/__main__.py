"""`python -m data_prep ...` is `specdistill prep ...`."""

from data_prep.prep import main

main()
