"""Checkpoints of a training run: written as one folder renamed into place, pruned to train.keep_last, tidied after a
kill, and loaded on resume (the newest that loads, a damaged one skipped for the one before it).

    <out_dir>/checkpoints/step_N/   accelerate state (weights, optimizer, scheduler, RNGs) + trainer_state.json

A checkpoint records the run's settings (`run_settings`) and the files it holds: a resumed run continues only with the
same settings (RESUMABLE_CHANGES may differ, train.max_steps may grow) and the same drafter shape and process count.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from specdistill.distill.errors import UserError
from specdistill.distill.json_files import read_json
from specdistill.distill.outputs import json_text, recover_folder, replace_folder, staging_folder, write_text_atomic

log = logging.getLogger("specdistill.train")
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
# keys a resumed run may change: where things live, what is logged, how often it evaluates and checkpoints
# (train.max_steps may grow; checked on its own)
RESUMABLE_CHANGES = ("out_dir", "cache_dir", "resume", "logger.", "train.max_steps", "train.log_every",
                     "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_last",
                     "train.tau_prompts", "train.tau.", "features.path")


def checkpoint_step(path: Path) -> int | None:
    """N for a `step_N` folder, else None."""
    number = path.name[len(CHECKPOINT_PREFIX) :]
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def missing_files(checkpoint: Path) -> list[str]:
    """What a checkpoint lacks of what it needs: its trainer_state.json, or files that state lists (weights, optimizer,
    scheduler, RNG states). Only what can be seen without reading the files; a damaged file is found by loading."""
    state_path = checkpoint / TRAINER_STATE
    if not state_path.is_file():
        return [TRAINER_STATE]
    try:
        files = json.loads(state_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):  # an unreadable state is damage, reported when the checkpoint is loaded
        return []
    return [name for name in files if not (checkpoint / name).is_file()]


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (`missing_files` finds nothing), oldest first."""
    found = [path for path in (out_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
             if checkpoint_step(path) is not None and not missing_files(path)]
    return sorted(found, key=checkpoint_step)


def tidy_checkpoints(out_dir: Path) -> None:
    """Undo an interrupted swap, then remove what interrupted saves and prunes left: staging and pruned folders, and
    step folders missing files (e.g. a kill while pruning). Main process only, before anything is loaded."""
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return
    for backup in folder.glob(f".{CHECKPOINT_PREFIX}*.old"):
        recover_folder(folder / backup.name[1 : -len(".old")])
    for entry in sorted(folder.iterdir()):
        missing = missing_files(entry) if checkpoint_step(entry) is not None else []
        if entry.name.startswith("."):
            reason = "left by an interrupted save or prune"
        elif missing:
            reason = f"an incomplete checkpoint: no {', '.join(missing[:3])}"
        else:
            continue
        log.info("removing %s (%s)", entry, reason)
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prune_checkpoint(checkpoint: Path) -> None:
    """Rename first, then delete: a kill during the deletion leaves a dot-folder that `tidy_checkpoints` removes, never
    a `step_N` that looks resumable but lacks its weights."""
    trash = checkpoint.with_name(f".{checkpoint.name}.pruned")
    checkpoint.rename(trash)
    shutil.rmtree(trash)


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, keep_last: int, trainer_state: dict) -> None:
    """Every process's accelerate state and trainer_state.json (with `step` and the list of files written), staged and
    renamed into place as one folder; then the oldest checkpoints beyond keep_last are pruned."""
    final = out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process
    with replace_folder(final) if main else nullcontext(staging_folder(final)) as staging:
        accelerator.wait_for_everyone()  # the main process has made the staging folder
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
        if main:
            files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
            write_text_atomic(staging / TRAINER_STATE, json_text({**trainer_state, "step": step, "files": files}))
    if main:
        for old in checkpoints(out_dir)[: -max(keep_last, 1)]:
            prune_checkpoint(old)
    accelerator.wait_for_everyone()


def damaged_file(checkpoint: Path) -> str | None:
    """The first of a checkpoint's files that does not load on its own, as `<path> (<error>)`; asked only after
    loading the whole checkpoint failed, to name the culprit."""
    from accelerate.utils import load as accelerate_load

    for path in sorted(path for path in checkpoint.rglob("*") if path.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                load_file(str(path))
            else:  # optimizer, scheduler and RNG states: torch.save files, read as accelerate reads them
                accelerate_load(path, map_location="cpu")  # weights_only, with accelerate's numpy allowlist
        except Exception as error:  # any decoding error of any format means the same: this file is damaged
            return f"{path} ({type(error).__name__}: {str(error)[:120]})"
    return None


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues: the resolved config as dotted keys, without
    RESUMABLE_CHANGES."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return {key: value for key, value in flat.items() if not key.startswith(RESUMABLE_CHANGES)}


def check_same_settings(saved: dict | None, cfg: DictConfig, where: Path) -> None:
    """Refuse to continue a run under other settings: they would be recorded but silently not used (the optimizer
    state, for one, carries the old learning rate)."""
    if saved is None:
        raise UserError(f"resume: {where} does not record its run's settings (written by an older specdistill), so "
                        "they cannot be checked; continue the run there with that version, or use another out_dir")
    current = json.loads(json_text(run_settings(cfg)))  # through JSON, as the saved side was
    unset = object()
    changed = [f"{key} {saved.get(key, '<unset>')!r} → {current.get(key, '<unset>')!r}"
               for key in sorted(saved.keys() | current.keys()) if saved.get(key, unset) != current.get(key, unset)]
    if changed:
        raise UserError(
            f"resume: the run in {where} was started with other "
            f"settings ({'; '.join(changed)}); a resumed run keeps its settings (only train.max_steps may grow, and the "
            "logging, evaluation and checkpoint intervals may change). Undo the changes to continue it, or give the "
            "new settings another out_dir."
        )


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def finished_drafter(out_dir: Path, cfg: DictConfig, is_main_process: bool) -> Path | None:
    """out_dir's drafter when its run reached train.max_steps with these settings; None when train.max_steps grew (the
    run continues from its newest checkpoint)."""
    drafter = out_dir / "drafter"
    summary = read_json(drafter / "summary.json", "resume", "move the drafter folder away to train again")
    try:
        reached = int(summary["final"]["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"resume: {drafter / 'summary.json'} cannot be read ({type(error).__name__}: {error}); "
                        "move the drafter folder away to train again") from None
    check_same_settings(summary.get("settings"), cfg, out_dir)
    max_steps = cfg.train.max_steps
    if max_steps < reached:
        raise UserError(f"train.max_steps={max_steps} is below step {reached}, where the run in {out_dir} "
                        f"already finished; set train.max_steps ≥ {reached}, or use another out_dir")
    if max_steps > reached:
        newest = checkpoints(out_dir)
        if not newest or checkpoint_step(newest[-1]) != reached:  # no checkpoint of its last step to continue from
            raise UserError(
                f"train.max_steps={max_steps}: the run in {out_dir} finished at step {reached}, but its "
                f"checkpoints/ holds no checkpoint of that step (written by an older specdistill, or removed), so it "
                "cannot be continued. Start the longer run in another out_dir, or from this drafter with "
                f"init_from={drafter}")
        log.info("train.max_steps grew from %d to %d: continuing the run in %s from step %d", reached, max_steps,
                 out_dir, reached)
        if cfg.optim.schedule.name != "constant":
            log.warning("optim.schedule=%s follows train.max_steps: its decay now ends at step %d, so the learning "
                        "rate rises from where the run ended to the longer schedule's value at step %d",
                        cfg.optim.schedule.name, max_steps, reached)
        return None
    if is_main_process:
        print(f"train: the run in {out_dir} already finished at step {reached}; its drafter is {drafter}. "
              "Raise train.max_steps to train it further.")
    return drafter


def resume(accelerator: Any, out_dir: Path, cfg: DictConfig, drafter_identity: dict) -> tuple[int, list[dict]]:
    """(first step, history): from the newest checkpoint in out_dir that loads into the prepared model, optimizer,
    scheduler and RNGs; a damaged one is skipped for the one before it (one line says which and why); none loading is
    an error naming the damaged file. (0, []) when there is none."""
    damaged = []
    for checkpoint in reversed(checkpoints(out_dir)):
        state, problem = load_checkpoint(accelerator, checkpoint, cfg, drafter_identity)
        if problem is None:
            log.info("resumed from %s (step %d)", checkpoint, state["step"])
            return state["step"], state["history"]
        damaged.append(problem)
        log.warning("resume: skipping the checkpoint %s: %s is damaged; trying the one before it",
                    checkpoint.name, problem)
    if damaged:
        raise UserError(f"resume: no checkpoint in {out_dir / 'checkpoints'} can be loaded (damaged: "
                        f"{'; '.join(damaged)}); delete the damaged checkpoints to start over, or use another out_dir")
    return 0, []


def load_checkpoint(accelerator: Any, checkpoint: Path, cfg: DictConfig,
                    drafter_identity: dict) -> tuple[dict, str | None]:
    """Load one checkpoint: (its trainer state, None), or (…, what is damaged). A checkpoint of other settings, another
    drafter or another process count is an error, not damage."""
    state_path = checkpoint / TRAINER_STATE
    problem, state = None, {}
    try:
        state = json.loads(state_path.read_text())
        state["step"], state["history"] = int(state["step"]), list(state["history"])
    except (ValueError, KeyError, TypeError) as error:
        problem = f"{state_path} ({type(error).__name__}: {str(error)[:120]})"
    if problem is None:
        check_same_drafter(checkpoint, state.get("drafter", {}), drafter_identity)
        written_by, now = state.get("num_processes", accelerator.num_processes), accelerator.num_processes
        if written_by != now:  # per-process optimizer shards and RNG states, and each process's share of the data
            raise UserError(f"resume: the checkpoint {checkpoint} was written by {written_by} processes, and this "
                            f"run has {now}; relaunch with {written_by} (torchrun --nproc_per_node {written_by}) "
                            "to continue it, or use another out_dir")
        check_same_settings(state.get("settings"), cfg, checkpoint.parent.parent)
        if cfg.train.max_steps < state["step"]:
            raise UserError(f"train.max_steps={cfg.train.max_steps} is below step {state['step']} of the "
                            f"checkpoint {checkpoint}; set train.max_steps ≥ {state['step']} to continue the run, "
                            "or use another out_dir")
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as error:  # torch, safetensors and pickle each fail in their own way on a damaged file
            problem = damaged_file(checkpoint) or f"{checkpoint} ({type(error).__name__}: {str(error)[:120]})"
    # every process loads its own RNG state: all move on together when any of them failed
    failures = accelerator.reduce(torch.tensor(float(problem is not None), device=accelerator.device), "sum")
    if problem is None and failures.item() > 0:
        problem = f"{checkpoint} (on another process)"
    return state, problem


def check_same_drafter(path: Path, saved: dict, current: dict) -> None:
    """A checkpoint of another target or drafter shape cannot be resumed: say so before loading it."""
    different = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if different:
        details = ", ".join(f"{key} {old!r} there vs {new!r} now" for key, (old, new) in different.items())
        raise UserError(
            f"resume: the checkpoint {path} is of another drafter or target ({details}). "
            "Match the original config to continue it, or use another out_dir."
        )
