"""Write-then-rename for every output a stage writes, so a crash never leaves a partial output looking complete and
never loses the previous complete one.

    with replace_folder(out_dir / "drafter") as staging:   # write everything into `staging`
        model.save_pretrained(staging)
    # now out_dir/drafter is the new folder; the old one was kept until the new one was in place

    write_text_atomic(out_dir / "report.json", text)      # a file: temporary name, then os.replace

A folder cannot be swapped in one system call, so the swap is: old → `.<name>.old`, staging → name, delete old. A
crash between the two renames leaves the old folder under `.<name>.old`; `recover_folder` (called by
`replace_folder` and by readers of the folder) puts it back.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def _backup(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_folder(final: Path) -> None:
    """Undo a swap interrupted between its two renames: the old complete folder goes back into place."""
    final, backup = Path(final), _backup(Path(final))
    if backup.exists():
        if final.exists():  # the swap finished; only the deletion of the old folder was interrupted
            shutil.rmtree(backup)
        else:
            backup.rename(final)


@contextmanager
def replace_folder(final: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; when the block ends without error, the staging folder replaces
    `final` (module doc). On error the staging folder is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    staging, backup = _staging(final), _backup(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        final.rename(backup)
    staging.rename(final)
    shutil.rmtree(backup, ignore_errors=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
