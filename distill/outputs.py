"""Write-then-rename for every output a stage writes, so a crash never leaves a partial output looking complete and
never loses the previous complete one.

    with replace_folder(out_dir / "drafter") as staging:   # write everything into `staging`
        model.save_pretrained(staging)
    # now out_dir/drafter is the new folder; the old one was kept until the new one was in place

    write_text_atomic(out_dir / "report.json", text)      # a file: temporary name, then os.replace
    with replace_file(out_dir / "plot.png") as partial:   # the same for a file written by another library
        figure.savefig(partial, format="png")

A folder cannot be swapped in one system call, so the swap is: old → `.<name>.old`, staging → name, delete old. A
crash between the two renames leaves the old folder under `.<name>.old`; `recover_folder` (called by
`replace_folder` and by readers of the folder) puts it back.

Also here: `hold_out_dir` (one run at a time per output folder), `json_text` (JSON without bare NaN) and the
`specdistill_run_stamp` resolver that makes the default run folder unique per run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from specdistill.distill.errors import UserError

LOCK_NAME = ".specdistill.lock"


def staging_folder(final: Path) -> Path:
    """Where `replace_folder(final)` stages the new folder (other processes of a run write into it too)."""
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
    staging, backup = staging_folder(final), _backup(final)
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


@contextmanager
def replace_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write the file to; when the block ends without error it is renamed
    into place, otherwise removed (a file's `replace_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    with replace_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = None, default: Any = None) -> str:
    """Strict JSON for files other tools read: NaN and ±inf become null (bare NaN is not JSON). `default` as in
    json.dumps (e.g. str, for configs holding enums or paths)."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False, default=default)


@contextmanager
def hold_out_dir(out_dir: Path | str) -> Iterator[None]:
    """Hold `<out_dir>/.specdistill.lock` for the block, so two runs never write into one folder at once; a second
    run fails at once with a `UserError`. The lock is the operating system's (the file is only its handle): it ends
    with the process that holds it, so a killed run never blocks the next one."""
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_dir / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"out_dir: {out_dir} is in use by another run (it holds {out_dir / LOCK_NAME}); wait for that "
                        "run to finish or choose another out_dir") from None
    try:
        yield
    finally:
        lock.release()


@functools.cache  # one value per process: the run folder and everything derived from it agree
def run_stamp() -> str:
    """`<date>/<H-M-S>-<id>` for the default run folder, unique per run. Under a launcher (torchrun, accelerate
    launch, deepspeed: LOCAL_RANK is set) every rank composes its own config, so all take the time and id of the
    launcher process they share; a single process takes the time now and a random id. SPECDISTILL_RUN_ID, when set,
    is the id (e.g. a scheduler's job id; multi-node runs need it, or an explicit out_dir)."""
    run_id = os.environ.get("SPECDISTILL_RUN_ID")
    if "LOCAL_RANK" in os.environ:
        import psutil

        launcher = psutil.Process().parent()
        started, run_id = launcher.create_time(), run_id or str(launcher.pid)
    else:
        started, run_id = time.time(), run_id or secrets.token_hex(3)
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started)) + f"-{run_id}"


def register_run_stamp_resolver() -> None:
    """`${specdistill_run_stamp:}`, used by conf/hydra/output for the default run folder."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("specdistill_run_stamp"):
        OmegaConf.register_new_resolver("specdistill_run_stamp", run_stamp)


# every stage module imports this one before its Hydra app composes conf/hydra/output
register_run_stamp_resolver()
