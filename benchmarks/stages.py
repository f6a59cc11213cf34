"""What the end-to-end benchmark scripts share: running one `specdistill` stage as a user would, its output in a log."""

from __future__ import annotations

import json
import os
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


def mt_bench_subset(out_dir: Path, per_category: int) -> Path:
    """The first `per_category` questions of each MT-Bench category of the packaged file `specdistill setup` places,
    in file order, written as a bench file (`bench=mt_bench bench.path=<it>`)."""
    from specdistill.distill.config import CACHE_ENV, DEFAULT_CACHE_DIR

    source = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser() / "real_bed/mt_bench/question.jsonl"
    if not source.is_file():
        sys.exit(f"{source}: no such file; run `specdistill setup` first")
    taken: dict[str, int] = {}
    lines = []
    for line in source.read_text().splitlines():
        category = json.loads(line)["category"]
        if taken.get(category, 0) < per_category:
            taken[category] = taken.get(category, 0) + 1
            lines.append(line)
    subset = out_dir / f"mt_bench_{per_category}_per_category.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    return subset
