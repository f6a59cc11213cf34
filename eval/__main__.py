"""`python -m eval ...` will be `specdistill eval ...` (eval must not import train, so it does not use the CLI)."""

import sys

sys.exit("error: `specdistill eval` is not built yet in this version of specdistill.")
