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

What a stage does with an existing `out_dir` is one rule, `check_out_dir`: it writes there when the folder is new or
empty, was written by the same stage (its `.specdistill_stage` marker; train resumes there, prep continues, eval
keeps the previous report under previous/, export and import replace their own folder), or the user said
`overwrite=true`; anything else (another stage's folder, a user's own files, a plain file) is refused with one line.
`claim_out_dir` applies it for the stages that write into out_dir, holds the folder, and removes a folder it made when
the stage fails before writing anything into it.

Also here: `hold_out_dir` (one run at a time per output folder), `json_text` (JSON without bare NaN) and the
`specdistill_run_stamp` resolver that makes the default run folder unique per run.
"""

from __future__ import annotations

import functools
import json
import logging
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
STAGE_MARKER = ".specdistill_stage"  # which stage wrote a folder: that stage may write there again
log = logging.getLogger("specdistill")


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
    default_file_modes(staging)
    try:
        if final.exists():
            final.rename(backup)
        staging.rename(final)
    except BaseException:  # e.g. a folder the user cannot write: nothing finished is left behind under a dot-name
        shutil.rmtree(staging, ignore_errors=True)
        recover_folder(final)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@functools.cache
def umask_file_mode() -> int:
    """The mode a new file gets from the user's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def default_file_modes(path: Path) -> None:
    """Give files written private (0600: safetensors' `save_file`, and through it `save_pretrained`) the mode every
    other output file has, so a shared or served folder is readable as a whole."""
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and file.stat().st_mode & 0o777 == 0o600:
            file.chmod(umask_file_mode())


@contextmanager
def replace_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write the file to; when the block ends without error it is renamed
    into place, otherwise removed (a file's `replace_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield partial
        default_file_modes(partial)
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


def stage_files(stage: str) -> set[str]:
    """What a stage's own run leaves in its out_dir besides its outputs: the marker, the lock, and Hydra's record of
    the run (`.hydra/`, `<stage>.log`) when out_dir is Hydra's run folder (the default)."""
    return {STAGE_MARKER, LOCK_NAME, ".hydra", f"{stage}.log"}


def folder_stage(folder: Path) -> str | None:
    """The stage that wrote `folder` (its marker), or None."""
    marker = folder / STAGE_MARKER
    return marker.read_text().strip() or None if marker.is_file() else None


def this_runs_entry(out_dir: Path) -> str | None:
    """The entry of `out_dir` that holds this run's own Hydra folder (`outputs/` when out_dir is the working folder)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    except (ImportError, ValueError):  # not a Hydra app (a test, a notebook): no such folder
        return None
    out = out_dir.resolve()
    return run_dir.relative_to(out).parts[0] if out in run_dir.parents else None


def check_out_dir(out_dir: Path, stage: str, overwrite: bool, replaces: bool = False) -> None:
    """The out_dir rule (module doc): return when `stage` may write into `out_dir`, else raise a `UserError`.
    `replaces`: the stage replaces the whole folder (export, import), so nothing in it counts as its own but its
    marker; a stage that writes beside what is there also lets this run's own Hydra folder be."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir: {out_dir} is a file, not a folder; give out_dir a folder path (a new one is made)")
    writer = folder_stage(out_dir) if out_dir.exists() else None
    if not out_dir.exists() or writer == stage:
        return
    own = {STAGE_MARKER} if replaces else {*stage_files(stage), this_runs_entry(out_dir)}
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in own)
    if not foreign:
        return
    if overwrite:
        log.warning("out_dir: %s holds %d entries that `specdistill %s` did not write; writing there (overwrite=true)",
                    out_dir, len(foreign), stage)
        return
    what = (f"the output of `specdistill {writer}`" if writer else
            f"files specdistill {stage} did not write ({', '.join(foreign[:4])}{', …' if len(foreign) > 4 else ''})")
    raise UserError(f"out_dir: {out_dir} holds {what}, and a stage never writes over what it did not write. Choose a "
                    f"new or empty folder, or add overwrite=true to {'replace that folder' if replaces else 'write into it'}")


def check_not_inside(out_dir: Path, source: Path, key: str) -> None:
    """Refuse an out_dir that is `source` or holds it: replacing out_dir would delete the input (even with
    overwrite=true, which gives up what out_dir holds, not the input)."""
    out, inside = out_dir.expanduser().resolve(), source.expanduser().resolve()
    if out == inside or out in inside.parents:
        raise UserError(f"out_dir: {out_dir} {'is' if out == inside else 'holds'} the {key} folder {source}, which "
                        "writing there would delete; choose another out_dir")


def mark_stage(folder: Path, stage: str) -> None:
    """Record that `stage` wrote `folder` (check_out_dir lets it write there again)."""
    (folder / STAGE_MARKER).write_text(stage + "\n")


@contextmanager
def claim_out_dir(out_dir: Path | str, stage: str, overwrite: bool) -> Iterator[Path]:
    """Check `out_dir` against the rule, make it, mark it as `stage`'s and hold it (`hold_out_dir`) for the block.
    When the block fails and the folder it made holds nothing but the marker and lock, the folder is removed, so a
    failed run leaves no empty output folder behind."""
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, stage, overwrite)
    made = not out_dir.exists()
    try:
        with hold_out_dir(out_dir):
            mark_stage(out_dir, stage)
            yield out_dir
    except BaseException:
        if made and out_dir.is_dir() and {entry.name for entry in out_dir.iterdir()} <= {STAGE_MARKER, LOCK_NAME}:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


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
