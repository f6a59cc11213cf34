"""specdistill train: distill a drafter of any registered kind from the frozen target, online (the target runs in the
loop) or from prep's offline feature cache (features.source=cache), on one process or many (distributed=ddp|zero2|
zero3|fsdp, train/distributed.py).

    specdistill train target=toy drafter=eagle3 data_dir=outputs/prep/<date>/<time>/dataset
    specdistill train target=toy drafter=eagle1 data_dir=... train.max_steps=1400 optim.lr=1e-3 optim.warmup_steps=50
    specdistill train drafter=eagle1 objective=hass objective.top_k_loss_weight=1 init_from=<stage A>/drafter ...
    specdistill train drafter=token_lm objective=tvd objective.data_source=on_policy data_dir=...
    specdistill train ... logger=wandb                                   # WANDB_MODE=offline logs locally
    specdistill train ... features.source=cache          # after `specdistill prep ... features.cache=true`
    torchrun --nproc_per_node 2 -m specdistill.train data_dir=...                    # DDP (one process per GPU, or gloo on CPU)
    torchrun --nproc_per_node 8 -m specdistill.train data_dir=... distributed=zero3  # DeepSpeed ZeRO-3 (zero2, fsdp alike)

setup (target, data, drafter, optimizer, resume) → train (accumulated steps, validation, checkpoints) → save:

    <out_dir>/drafter/          save_pretrained (safetensors) + resolved_config.yaml + summary.json
    <out_dir>/checkpoints/step_N   accelerate state + trainer_state.json; resume=auto continues from the newest

One run at a time holds out_dir (a lock). A checkpoint records the run's settings and the files it holds: resume=auto
continues only with the same settings (train.max_steps may grow; logging, evaluation and checkpoint intervals may
change), skips a damaged checkpoint for the one before it, and removes partial ones. resume=never refuses an out_dir
that holds a run, so an old run is never deleted for you. A run whose drafter is finished is not trained again.

Gradient accumulation is normalised per token: every micro-batch's summed loss is divided by the number of
trained positions in the whole optimizer step (all micro-batches, all processes), so a step's gradient does not
depend on how the tokens were split into micro-batches.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack, nullcontext
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.targets import (eos_token_ids, load_target_model, load_target_tokenizer,
                                        tokenizer_fingerprint)
from specdistill.distill.drafters import drafter_kind, load_drafting, resolve_objective
from specdistill.distill.decoding import check_draft_depth
from specdistill.distill.schedule import lr_factor
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.json_files import read_json
from specdistill.distill.outputs import (claim_out_dir, json_text, recover_folder, replace_folder, staging_folder,
                                         write_text_atomic)
from specdistill.distill.objectives import Objective, expected_accept_length
from specdistill.distill.target import FrozenTarget
from specdistill.train.config import check_ranges, register_configs
from specdistill.distill.multirun import sweep_job
from specdistill.train.distributed import end_run, make_accelerator
from specdistill.train.live_tau import decode_counts, tau_counts_size, tau_metrics, validation_prompts

log = logging.getLogger("specdistill.train")
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
# keys a resumed run may change: where things live, what is logged, how often it evaluates and checkpoints
# (train.max_steps may grow; checked on its own)
RESUMABLE_CHANGES = ("out_dir", "cache_dir", "resume", "logger.", "train.max_steps", "train.log_every",
                     "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_last",
                     "train.tau_prompts", "train.tau.", "features.path")


# ---------------------------------------------------------------------------------------------------------------
# Data: a seeded order that a resumed run can re-enter at any micro-batch


def load_prepared_dataset(data_dir: Path, tokenizer: Any) -> tuple[Any, torch.Tensor | None]:
    """The prep output's DatasetDict and its masked-token counts, checked against the target tokenizer."""
    import datasets

    if not (data_dir / "dataset_dict.json").exists():
        raise UserError(f"data_dir: {data_dir} is not a `specdistill prep` output (no dataset_dict.json there)")
    try:
        dataset = datasets.load_from_disk(str(data_dir))
    except Exception as error:  # a damaged or foreign folder: arrow, json and index errors of many kinds
        raise UserError(f"data_dir: cannot read {data_dir} as a dataset ({type(error).__name__}: {error}); "
                        "run `specdistill prep` again") from None
    stats_path = data_dir / "stats.json"
    if stats_path.exists():
        stats = read_json(stats_path, "data_dir", "run `specdistill prep` again")
        expected = stats.get("tokenizer", {}).get("fingerprint")
        if expected is not None and expected != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"data_dir: {data_dir} was prepared with another tokenizer ({stats['tokenizer'].get('name_or_path')}) "
                "than this target's. Run `specdistill prep` again with this target."
            )
    else:
        log.warning("data_dir: %s has no stats.json, so the tokenizer it was prepared with is unknown; checking its "
                    "token ids against the target's vocabulary only", data_dir)
    if "train" not in dataset or len(dataset["train"]) == 0:
        raise UserError(f"data_dir: {data_dir} has no training records; check its stats.json for why prep dropped them")
    largest = largest_token_id(dataset)
    if largest >= len(tokenizer):  # it would end in an IndexError inside the target's embedding
        missing = " (its stats.json is missing, so the tokenizer could not be checked)" if not stats_path.exists() else ""
        raise UserError(
            f"data_dir: {data_dir} holds token id {largest}, but this target's tokenizer has {len(tokenizer)} tokens: "
            f"it was prepared for another target{missing}. Run `specdistill prep` again with this target."
        )
    counts_path = data_dir / "token_counts.safetensors"
    counts = load_file(str(counts_path))["counts"] if counts_path.exists() else None
    return dataset, counts


def largest_token_id(dataset: Any) -> int:
    """The largest token id in any split (-1 when empty), read from the Arrow columns without decoding rows."""
    import pyarrow.compute as pc

    largest = [pc.max(pc.list_flatten(split.data.column("input_ids"))).as_py() for split in dataset.values()]
    return max((value for value in largest if value is not None), default=-1)


def collate(rows: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask (0 on padding)."""
    length = min(max(len(row["input_ids"]) for row in rows), max_length)
    batch = {key: torch.zeros(len(rows), length, dtype=torch.long) for key in ("input_ids", "attention_mask", "loss_mask")}
    for index, row in enumerate(rows):
        ids = row["input_ids"][:length]
        batch["input_ids"][index, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][index, : len(ids)] = 1
        batch["loss_mask"][index, : len(ids)] = torch.tensor(row["loss_mask"][:length])
    return batch


def batches_per_epoch(size: int, batch_size: int) -> int:
    """Whole micro-batches in one pass over `size` rows (at least one)."""
    return max(1, size // batch_size)


def micro_batch_indices(size: int, batch_size: int, seed: int, start: int) -> Iterator[list[int]]:
    """Global micro-batches of a dataset of `size` rows, epoch after epoch (each epoch a seeded permutation), from
    micro-batch number `start` on: the order depends only on (seed, number), so a resumed run sees the same data."""
    per_epoch = batches_per_epoch(size, batch_size)
    number, order_epoch, order = start, None, None
    while True:
        epoch, position = divmod(number, per_epoch)
        if epoch != order_epoch:  # one permutation per epoch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            order_epoch = epoch
        yield order[position * batch_size : (position + 1) * batch_size].tolist()
        number += 1


# ---------------------------------------------------------------------------------------------------------------
# Model glue


class DraftTraining(nn.Module):
    """The drafter's training loss as a module forward, so DDP/DeepSpeed wrappers see a forward call."""

    def __init__(self, drafter: nn.Module, objective: Objective):
        super().__init__()
        self.drafter, self.objective = drafter, objective

    def forward(self, batch: dict[str, torch.Tensor], target_output: Any, objective: Objective | None = None):
        """The loss under the training objective, or `objective` (validation's): always through this forward, so
        ZeRO-3 and FSDP gather the sharded weights."""
        return self.drafter.training_loss(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                          target_output, objective or self.objective)


def warmup_steps(optim: Any, max_steps: int) -> int:
    """optim.warmup_ratio × train.max_steps when the ratio is set, else optim.warmup_steps."""
    if optim.warmup_ratio is None:
        return optim.warmup_steps
    return round(optim.warmup_ratio * max_steps)


def announce_schedule(optim: Any, max_steps: int) -> dict:
    """Check the warm-up against the run's length, log the effective schedule, and return it (recorded in summaries).
    A warm-up as long as the run never reaches optim.lr: that is warned about loudly, not left to be found later."""
    if optim.warmup_ratio is not None and not 0 <= optim.warmup_ratio <= 1:
        raise UserError(f"optim.warmup_ratio: {optim.warmup_ratio} is not a fraction of train.max_steps (0 to 1)")
    if optim.warmup_ratio is None and optim.warmup_steps < 0:
        raise UserError(f"optim.warmup_steps: {optim.warmup_steps} is negative; use 0 for no warm-up")
    warmup = warmup_steps(optim, max_steps)
    source = (f"optim.warmup_ratio={optim.warmup_ratio}" if optim.warmup_ratio is not None
              else f"optim.warmup_steps={optim.warmup_steps}")
    if warmup >= max_steps:
        log.warning("WARNING: the warm-up (%s: %d steps) is as long as the run (train.max_steps=%d): the learning rate "
                    "never reaches optim.lr=%g (it peaks at %.3g). Set optim.warmup_ratio=0.1 or a smaller "
                    "optim.warmup_steps.", source, warmup, max_steps, optim.lr, optim.lr * max_steps / warmup)
    schedule = optim.schedule.name
    decay = "constant" if schedule == "constant" else f"{schedule} decay to {optim.lr * optim.min_lr_ratio:g}"
    log.info("schedule: lr %g, warm-up %d steps (%s), then %s by step %d (train.max_steps)",
             optim.lr, warmup, source, decay, max_steps)
    return {"lr": optim.lr, "warmup_steps": warmup, "schedule": schedule, "min_lr_ratio": optim.min_lr_ratio,
            "max_steps": max_steps}


def lr_lambda(cfg: Any, max_steps: int) -> Callable[[int], float]:
    """`optim`'s schedule as LambdaLR's factor: linear warm-up, then cosine / linear decay to lr × min_lr_ratio (or
    constant), distill/schedule.py's `lr_factor`."""
    warmup, floor, schedule = warmup_steps(cfg, max_steps), cfg.min_lr_ratio, cfg.schedule.name
    return lambda step: lr_factor(step, warmup, max_steps, schedule, floor)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


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
# The recipe


class TrainRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir).expanduser()
        self.held = ExitStack()  # the out_dir lock, released when the run ends however it ends

    def open_out_dir(self) -> Path | None:
        """Start the accelerator, lock out_dir for this run, tidy what interrupted runs left, and check that `resume`
        fits what out_dir holds. Returns the drafter when the run there is already finished (nothing to train)."""
        from accelerate.utils import broadcast_object_list

        cfg = self.cfg
        if cfg.resume not in ("auto", "never"):
            raise UserError(f"resume: '{cfg.resume}' is not one of auto, never")
        check_ranges(cfg)
        self.data_dir = Path(cfg.data_dir).expanduser()
        if not self.data_dir.exists():
            raise UserError(f"data_dir: {self.data_dir} does not exist; point it at the dataset folder `specdistill prep` wrote")
        precision = cfg.train.mixed_precision.name
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = make_accelerator(cfg, precision, None if cfg.logger.name == "none" else cfg.logger.name)
        refusal = None
        if self.accelerator.is_main_process:
            try:
                # the out_dir rule (distill/outputs.py): an empty folder, a train run's (resumed), or overwrite=true
                self.held.enter_context(claim_out_dir(self.out_dir, "train", cfg.overwrite))
                recover_folder(self.out_dir / "drafter")
                tidy_checkpoints(self.out_dir)
            except UserError as error:
                refusal = str(error)
        [refusal] = broadcast_object_list([refusal])  # every process stops, not only the main one
        if refusal:
            raise UserError(refusal)

        drafter, found = self.out_dir / "drafter", checkpoints(self.out_dir)
        if cfg.resume == "never" and (found or drafter.exists()):
            held = " and ".join(name for name, present in (("checkpoints/", found), ("drafter/", drafter.exists())) if present)
            raise UserError(
                f"resume=never: out_dir {self.out_dir} already holds a run ({held}), and it is never deleted for you. "
                "Continue it with resume=auto, choose another out_dir, or delete those folders yourself to start over."
            )
        if cfg.resume == "auto" and (drafter / "summary.json").is_file():
            return self._finished_drafter(drafter)
        return None

    def _finished_drafter(self, drafter: Path) -> Path | None:
        """`drafter` when its run reached train.max_steps with these settings; None when train.max_steps grew (the run
        continues from its newest checkpoint)."""
        summary = read_json(drafter / "summary.json", "resume", "move the drafter folder away to train again")
        try:
            reached = int(summary["final"]["step"])
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"resume: {drafter / 'summary.json'} cannot be read ({type(error).__name__}: {error}); "
                            "move the drafter folder away to train again") from None
        check_same_settings(summary.get("settings"), self.cfg, self.out_dir)
        max_steps = self.cfg.train.max_steps
        if max_steps < reached:
            raise UserError(f"train.max_steps={max_steps} is below step {reached}, where the run in {self.out_dir} "
                            f"already finished; set train.max_steps ≥ {reached}, or use another out_dir")
        if max_steps > reached:
            newest = checkpoints(self.out_dir)
            if not newest or checkpoint_step(newest[-1]) != reached:  # no checkpoint of its last step to continue from
                raise UserError(
                    f"train.max_steps={max_steps}: the run in {self.out_dir} finished at step {reached}, but its "
                    f"checkpoints/ holds no checkpoint of that step (written by an older specdistill, or removed), so it "
                    "cannot be continued. Start the longer run in another out_dir, or from this drafter with "
                    f"init_from={drafter}")
            log.info("train.max_steps grew from %d to %d: continuing the run in %s from step %d", reached, max_steps,
                     self.out_dir, reached)
            if self.cfg.optim.schedule.name != "constant":
                log.warning("optim.schedule=%s follows train.max_steps: its decay now ends at step %d, so the learning "
                            "rate rises from where the run ended to the longer schedule's value at step %d",
                            self.cfg.optim.schedule.name, max_steps, reached)
            return None
        if self.accelerator.is_main_process:
            print(f"train: the run in {self.out_dir} already finished at step {reached}; its drafter is {drafter}. "
                  "Raise train.max_steps to train it further.")
        return drafter

    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        set_seed(cfg.seed)
        kind = drafter_kind(cfg.drafter.kind)
        self.objective = resolve_objective(kind, cfg.objective)  # a wrong objective fails before anything loads
        tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
        self.dataset, token_counts = load_prepared_dataset(self.data_dir, tokenizer)
        model = load_target_model(cfg.target, cfg.cache_dir, device=self.accelerator.device)
        self.target = FrozenTarget(model)
        self.eos_token_ids = eos_token_ids(tokenizer, model)
        self.tau_prompts = validation_prompts(self.dataset["validation"], cfg.train.tau_prompts)
        if cfg.train.tau_prompts and len(self.tau_prompts) < cfg.train.tau_prompts:
            log.warning("train.tau_prompts=%d: the validation split has %d record(s) long enough to prompt the "
                        "decoder (train/live_tau.py), so the decoded τ uses %d prompt(s)%s", cfg.train.tau_prompts,
                        len(self.tau_prompts), len(self.tau_prompts), "" if self.tau_prompts else " (it is not measured)")
        context = BuildContext(self.target, token_counts, str(cfg.target.name_or_path), cfg.target.revision)
        drafter = kind.model_class.build(OmegaConf.to_object(cfg.drafter), context)
        drafter.check_target(self.target, "drafter")
        if cfg.init_from is not None:  # before any checkpoint: a resumed run continues from its own weights
            drafter.load_initial_weights(Path(cfg.init_from).expanduser())
            log.info("drafter weights start from %s (init_from)", cfg.init_from)
        drafter = drafter.to(self.accelerator.device)
        self.tau_decoding = OmegaConf.to_object(cfg.train.tau)
        if self.tau_prompts:  # as eval does, refuse a draft deeper than the drafter makes, here before the first step
            check_draft_depth(drafter.max_depth, self.tau_decoding, "train.tau", type(drafter).__name__)
        log.info("drafter %s reads target layers %s; objective %s", kind.name, list(drafter.feature_layers),
                 type(self.objective).__name__)
        self.drafter = drafter
        self.feature_cache = None
        if cfg.features.source.name == "cache":  # the target's forward is not run: prep's cache stands in for it
            from specdistill.distill.feature_cache import open_feature_cache

            path = Path(cfg.features.path).expanduser() if cfg.features.path else self.data_dir.parent / "features"
            self.feature_cache = open_feature_cache(path, self.target, self.dataset, drafter.feature_layers,
                                                    self.objective, self.data_dir)
        optimizer = torch.optim.AdamW(
            [p for p in drafter.parameters() if p.requires_grad], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.schedule = announce_schedule(cfg.optim, cfg.train.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
        self.module, self.optimizer = self.accelerator.prepare(DraftTraining(drafter, self.objective), optimizer)
        # not prepared: accelerate would step it once per process, and our schedule counts optimizer steps
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        self.start_step, self.history = self._resume()
        self.tokens_trained = self.history[-1].get("tokens_trained", 0) if self.history else 0
        if cfg.logger.name != "none":
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            self.accelerator.init_trackers(cfg.logger.project, config=config,
                                           init_kwargs={cfg.logger.name: {"name": cfg.logger.run_name}})

    def _resume(self) -> tuple[int, list[dict]]:
        """(first step, history): from the newest checkpoint that loads; a damaged one is skipped for the one before
        it (one line says which and why); none loading is an error naming the damaged file."""
        damaged = []
        for checkpoint in reversed(checkpoints(self.out_dir)):  # resume=never found none (open_out_dir)
            state, problem = self._load_checkpoint(checkpoint)
            if problem is None:
                log.info("resumed from %s (step %d)", checkpoint, state["step"])
                return state["step"], state["history"]
            damaged.append(problem)
            log.warning("resume: skipping the checkpoint %s: %s is damaged; trying the one before it",
                        checkpoint.name, problem)
        if damaged:
            raise UserError(f"resume: no checkpoint in {self.out_dir / 'checkpoints'} can be loaded (damaged: "
                            f"{'; '.join(damaged)}); delete the damaged checkpoints to start over, or use another out_dir")
        return 0, []

    def _load_checkpoint(self, checkpoint: Path) -> tuple[dict, str | None]:
        """Load one checkpoint into the model, optimizer, scheduler and RNGs: (its trainer state, None), or (…, what is
        damaged). Settings that differ from the checkpoint's are an error, not damage."""
        state_path = checkpoint / TRAINER_STATE
        problem, state = None, {}
        try:
            state = json.loads(state_path.read_text())
            state["step"], state["history"] = int(state["step"]), list(state["history"])
        except (ValueError, KeyError, TypeError) as error:
            problem = f"{state_path} ({type(error).__name__}: {str(error)[:120]})"
        if problem is None:
            self._check_checkpoint_drafter(checkpoint, state.get("drafter", {}))
            written_by, now = state.get("num_processes", self.accelerator.num_processes), self.accelerator.num_processes
            if written_by != now:  # per-process optimizer shards and RNG states, and each process's share of the data
                raise UserError(f"resume: the checkpoint {checkpoint} was written by {written_by} processes, and this "
                                f"run has {now}; relaunch with {written_by} (torchrun --nproc_per_node {written_by}) "
                                "to continue it, or use another out_dir")
            check_same_settings(state.get("settings"), self.cfg, self.out_dir)
            if self.cfg.train.max_steps < state["step"]:
                raise UserError(f"train.max_steps={self.cfg.train.max_steps} is below step {state['step']} of the "
                                f"checkpoint {checkpoint}; set train.max_steps ≥ {state['step']} to continue the run, "
                                "or use another out_dir")
            try:
                self.accelerator.load_state(str(checkpoint))
            except Exception as error:  # torch, safetensors and pickle each fail in their own way on a damaged file
                problem = damaged_file(checkpoint) or f"{checkpoint} ({type(error).__name__}: {str(error)[:120]})"
        # every process loads its own RNG state: all move on together when any of them failed
        failures = self.accelerator.reduce(torch.tensor(float(problem is not None), device=self.accelerator.device), "sum")
        if problem is None and failures.item() > 0:
            problem = f"{checkpoint} (on another process)"
        return state, problem

    def _check_checkpoint_drafter(self, path: Path, saved: dict) -> None:
        """A checkpoint of another target or drafter shape cannot be resumed: say so before loading it."""
        current = self.drafter.identity()
        different = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if different:
            details = ", ".join(f"{key} {old!r} there vs {new!r} now" for key, (old, new) in different.items())
            raise UserError(
                f"resume: the checkpoint {path} is of another drafter or target ({details}). "
                "Match the original config to continue it, or use another out_dir."
            )

    def _micro_batches(self, split: str, batch_size: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of each global micro-batch, on its device."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rows = self.dataset[split]
        for indices in micro_batch_indices(len(rows), batch_size * world, self.cfg.seed, start):
            mine = indices[rank::world] or indices[:1]
            batch = collate([rows[i] for i in mine], self.cfg.train.max_length)
            batch["index"] = torch.tensor(mine)  # each row's record: the feature cache is read by it
            yield {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def _target_output(self, batch: dict[str, torch.Tensor], split: str, for_training: bool = False) -> Any:
        """What the target gives the drafter's loss for this micro-batch of `split`: its logits and the drafter's
        feature layers, from its forward or (features.source=cache) from prep's feature cache."""
        if self.feature_cache is not None:
            return self.feature_cache.target_output(split, batch["index"], batch["input_ids"], batch["loss_mask"])
        return self.target(batch["input_ids"], batch["attention_mask"], feature_layers=self.drafter.feature_layers,
                           for_training=for_training)

    @torch.no_grad()
    def _prepare(self, batch: dict[str, torch.Tensor], step: int, index: int) -> dict[str, torch.Tensor]:
        """The drafter's chance to replace a training micro-batch before the target scores it (on-policy token-level
        distillation samples the responses here). Its generator depends only on (seed, step, micro-batch, process),
        so a resumed run makes the same choices."""
        seed = ((self.cfg.seed * 1_000_003 + step) * 1_009 + index) * 997 + self.accelerator.process_index
        generator = torch.Generator().manual_seed(seed)
        return self.drafter.prepare_batch(batch, self.objective, generator)

    def train(self) -> dict:
        cfg, accelerator = self.cfg, self.accelerator
        loop = cfg.train
        batches = self._micro_batches("train", loop.batch_size, self.start_step * loop.grad_accum)
        progress = tqdm(range(self.start_step, loop.max_steps), initial=self.start_step, total=loop.max_steps,
                        desc="train", unit="step", disable=not accelerator.is_main_process)
        if self.start_step == 0:  # the untrained drafter's agreement: the baseline every later value is read against
            self.history.append({"step": 0, **self.validate()})
        window_tokens, window_start = 0, time.perf_counter()
        self.first_step_records, self.records_seen = [], set()
        for step in progress:
            drawn = [next(batches) for _ in range(loop.grad_accum)]
            self._note_records(step, drawn)
            micro = [self._prepare(batch, step, index) for index, batch in enumerate(drawn)]
            # positions trained on in the whole step, over every process: the per-token normaliser
            step_tokens = sum(self.drafter.trained_rows(batch["loss_mask"]).sum() for batch in micro)
            step_tokens = accelerator.reduce(step_tokens.float(), reduction="sum").clamp(min=1)
            loss_total, local_tokens, agree, counted = 0.0, 0, 0, 0
            self.module.train()
            for index, batch in enumerate(micro):
                target_output = self._target_output(batch, "train", for_training=True)
                # accumulate: gradients are synchronised (DeepSpeed: stepped) on the step's last micro-batch only
                with accelerator.accumulate(self.module):
                    loss = self.module(batch, target_output)
                    # accelerate (or DeepSpeed) divides by grad_accum and the processes' gradients are averaged:
                    # scale back up so the step's gradient is a per-token mean
                    accelerator.backward(loss.loss_sum * accelerator.num_processes * loop.grad_accum / step_tokens)
                loss_total += loss.loss_sum.item()
                agree, counted = agree + loss.agree, counted + loss.counted
                local_tokens += int(batch["attention_mask"].sum())
            totals = accelerator.reduce(torch.tensor([loss_total, local_tokens], device=accelerator.device), "sum")
            loss_value = totals[0].item() / step_tokens.item()
            grad_norm = accelerator.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip_norm)
            self._stop_if_diverged(step + 1, loss_value, float(grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            self.tokens_trained += int(totals[1].item())
            window_tokens += int(totals[1].item())
            agreement = (agree / counted.clamp(min=1)).tolist()
            record = {"step": step + 1, "tokens_trained": self.tokens_trained, "loss": loss_value,
                      "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "train_top1": agreement[0]}
            if (step + 1) % loop.eval_every == 0 or step + 1 == loop.max_steps:
                record.update(self.validate())
            self.history.append(record)
            if (step + 1) % loop.log_every == 0 or "val_top1" in record:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                shown = {"loss": f"{loss_value:.3f}", "tau_proxy": f"{expected_accept_length(agreement):.2f}"}
                if "val_tau" in record:  # the real decoder's τ beside the proxy
                    shown["val_tau"] = f"{record['val_tau']:.2f}"
                progress.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
                accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step + 1)
            # the last step is always checkpointed: a later run with a larger train.max_steps continues from it
            if (step + 1) % loop.checkpoint_every == 0 or step + 1 == loop.max_steps:
                save_checkpoint(accelerator, self.out_dir, step + 1, loop.keep_last,
                                {"history": self.history, "drafter": self.drafter.identity(),
                                 "settings": run_settings(cfg), "schedule": self.schedule,
                                 "num_processes": accelerator.num_processes})
        final = self.history[-1]
        if "val_top1" not in final:  # resumed at train.max_steps: the loop above ran no step that validates
            final.update(self.validate())
        return final

    def _note_records(self, step: int, micro: list[dict[str, torch.Tensor]]) -> None:
        """Which records this process trains on (summary.json: data_shards), to show every process gets its own."""
        records = [int(index) for batch in micro for index in batch["index"].tolist()]
        if step == self.start_step:
            self.first_step_records = records
        self.records_seen.update(records)

    def _stop_if_diverged(self, step: int, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient would poison the weights: stop before the optimizer step, without a drafter.
        The checkpoint of the step before, if any, holds the weights that diverged: it is removed, so resume=auto never
        continues from them. (Under fp16 an infinite gradient is the loss scaler's to skip.)"""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.accelerator.mixed_precision == "fp16"):
            return
        diverged = self.out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step - 1}"
        removed = f" Removed {diverged}, whose weights diverged." if diverged.is_dir() else ""
        if removed and self.accelerator.is_main_process:
            prune_checkpoint(diverged)
        raise UserError(
            f"train: step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: training diverged, so it stopped "
            f"without writing a drafter.{removed} Lower optim.lr (now {self.cfg.optim.lr:g}) or lengthen the warm-up "
            "(optim.warmup_ratio), and start again in another out_dir."
        )

    @torch.no_grad()
    def validate(self) -> dict:
        """Top-1 agreement with the target at every training-time-test step on the validation split (no noise)."""
        if len(self.dataset["validation"]) == 0:
            return {}
        self.module.eval()
        objective = self.objective.for_validation()
        agree = counted = 0
        batches = self._micro_batches("validation", self.cfg.train.batch_size, 0)
        global_batch = self.cfg.train.batch_size * self.accelerator.num_processes
        for _ in range(min(self.cfg.train.eval_batches, batches_per_epoch(len(self.dataset["validation"]), global_batch))):
            batch = next(batches)
            target_output = self._target_output(batch, "validation")
            loss = self.module(batch, target_output, objective)
            agree, counted = agree + loss.agree, counted + loss.counted
        agree = self.accelerator.reduce(agree, "sum")
        counted = self.accelerator.reduce(counted, "sum")
        per_step = (agree / counted.clamp(min=1)).tolist()
        metrics = {"val_top1": per_step[0], "val_tau_proxy": expected_accept_length(per_step)}
        metrics.update({f"val_top1_step{step}": value for step, value in enumerate(per_step)})
        if self.tau_prompts:
            metrics.update(self.decoded_tau())
        return metrics

    def decoded_tau(self) -> dict:
        """τ and α per position by the real decoder (train.tau's settings) with the current weights (train/live_tau.py).
        The main process writes the weights as a drafter folder and loads it as `specdistill eval` does: the same
        path under every distributed mode, sharded weights included. The other processes wait for its counts."""
        accelerator = self.accelerator
        weights = self._drafter_weights()
        counts = torch.zeros(tau_counts_size(self.tau_decoding), dtype=torch.float64)
        if accelerator.is_main_process:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # no save and load bars inside the training bar
            try:
                with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=".decoded_tau_") as snapshot:
                    self.drafter.save_pretrained(snapshot, state_dict=weights, safe_serialization=True)
                    drafting = load_drafting(snapshot, self.target, accelerator.device,
                                             self.cfg.target.trust_remote_code)
            finally:
                transformers_logging.enable_progress_bar()
            counts = decode_counts(drafting, self.target, self.tau_prompts, self.tau_decoding, self.eos_token_ids,
                                   self.cfg.seed)
        return tau_metrics(accelerator.reduce(counts.to(accelerator.device), "sum").cpu(), self.tau_decoding)

    def _drafter_weights(self) -> dict[str, torch.Tensor] | None:
        """The drafter's whole state dict on the main process (None on the others). Every process calls it: under
        ZeRO-3 and FSDP the weights are gathered from all of them."""
        state = self.accelerator.get_state_dict(self.module)
        if not self.accelerator.is_main_process:
            return None
        return {name.removeprefix("drafter."): tensor for name, tensor in state.items()}

    def save(self, final_metrics: dict) -> Path:
        """The drafter (save_pretrained, safetensors), the resolved config and a summary, renamed into place."""
        from accelerate.utils import gather_object

        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        final = self.out_dir / "drafter"
        weights = self._drafter_weights()
        shards = gather_object([{"process": accelerator.process_index, "records_seen": len(self.records_seen),
                                 "first_step_records": self.first_step_records}])
        if accelerator.is_main_process:
            with replace_folder(final) as staging:  # the previous drafter stays until the new one is complete
                self.drafter.save_pretrained(staging, state_dict=weights, safe_serialization=True)
                (staging / "resolved_config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
                summary = {"final": final_metrics, "history": self.history, "settings": run_settings(self.cfg),
                           "schedule": self.schedule, "data_shards": shards}
                (staging / "summary.json").write_text(json_text(summary, indent=1))
            print(f"train: step {final_metrics.get('step')}: loss {_metric(final_metrics, 'loss', '.4f')}, "
                  f"validation top-1 {_metric(final_metrics, 'val_top1', '.3f')}, "
                  f"τ {_metric(final_metrics, 'val_tau', '.2f')} (decoded; proxy "
                  f"{_metric(final_metrics, 'val_tau_proxy', '.2f')})\ntrain: wrote {final}")
        accelerator.wait_for_everyone()  # no process tears the group down while the drafter is being written
        end_run(accelerator)
        return final


def _metric(metrics: dict, key: str, spec: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else format(value, spec)


def train(cfg: DictConfig) -> Path:
    """Train (or continue) the run in cfg.out_dir; returns its drafter folder."""
    recipe = TrainRecipe(cfg)
    with recipe.held:
        finished = recipe.open_out_dir()
        if finished is not None:
            return finished
        recipe.setup()
        return recipe.save(recipe.train())


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@exit_on_user_error
@sweep_job  # --multirun: returns the job's metric, records a failure in job_result.json and goes on (distill/multirun.py)
def main(cfg: DictConfig) -> Path:
    drafter = train(cfg)
    if cfg.distributed.mode.value != "ddp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed's and FSDP's gloo groups sometimes abort the process at interpreter exit ("terminate called
        # without an active exception") after a complete run; everything is written and closed by now
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return drafter


if __name__ == "__main__":
    main()
