"""What the end-to-end benchmark scripts share: running one `specdistill` stage as a user would, its output in a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def specdistill(*args: str, log: Path) -> None:
    """Run one `specdistill` stage, its output in `log`; stop with the log's tail when it fails."""
    with log.open("w") as handle:
        result = subprocess.run([sys.executable, "-m", "specdistill.cli.main", *args], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): specdistill {' '.join(args)}\n{log.read_text()[-3000:]}")
