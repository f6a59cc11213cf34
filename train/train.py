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

open_out_dir (lock, tidy, a finished run is not trained again) → setup (a builder per component: data and target,
drafter, feature source, optimizer, resume, logger) → train (one `train_step` per optimizer step; validation,
checkpoints) → save:

    <out_dir>/drafter/          save_pretrained (safetensors) + resolved_config.yaml + summary.json
    <out_dir>/checkpoints/step_N   accelerate state + trainer_state.json (train/checkpoints.py); resume=auto continues

One run at a time holds out_dir (a lock). A checkpoint records the run's settings and the files it holds: resume=auto
continues only with the same settings (train.max_steps may grow; logging, evaluation and checkpoint intervals may
change), skips a damaged checkpoint for the one before it, and removes partial ones. resume=never refuses an out_dir
that holds a run, so an old run is never deleted for you. A run whose drafter is finished is not trained again.

Gradient accumulation is normalised per token: every micro-batch's summed loss is divided by the number of
trained positions in the whole optimizer step (all micro-batches, all processes), so a step's gradient does not
depend on how the tokens were split into micro-batches.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.decoding import check_draft_depth, check_tree_width
from specdistill.distill.drafters import drafter_kind, load_drafting, resolve_objective
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.multirun import sweep_job
from specdistill.distill.objectives import Objective, expected_accept_length
from specdistill.distill.outputs import claim_out_dir, json_text, recover_folder, replace_folder
from specdistill.distill.target import FrozenTarget
from specdistill.distill.targets import eos_token_ids, load_target_model, load_target_tokenizer
from specdistill.train.checkpoints import (CHECKPOINT_PREFIX, checkpoints, finished_drafter, prune_checkpoint, resume,
                                           run_settings, save_checkpoint, tidy_checkpoints)
from specdistill.train.config import check_ranges, register_configs
from specdistill.train.data import (batches_per_epoch, collate, load_prepared_dataset, micro_batch_indices,
                                    row_lengths)
from specdistill.train.distributed import end_run, make_accelerator, resolve_precision
from specdistill.train.live_tau import decode_counts, tau_counts_size, tau_metrics, validation_prompts
from specdistill.train.optim import build_optimizer

log = logging.getLogger("specdistill.train")


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
        # DeepSpeed's bf16/fp16 holds the drafter itself in that dtype and runs no autocast, while the target's
        # features and the frozen target modules a drafter borrows (LM head, embeddings) keep the target's dtype:
        # autocast reconciles them. DDP and FSDP keep float32 weights and autocast through accelerate already.
        dtype = next(self.drafter.parameters()).dtype
        with torch.autocast(batch["input_ids"].device.type, dtype=dtype,
                            enabled=dtype in (torch.bfloat16, torch.float16)):
            return self.drafter.training_loss(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                              target_output, objective or self.objective)


class TrainRecipe:
    """One training run in out_dir: `open_out_dir`, then `setup`, `train` and `save` (see `train` below)."""

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
        precision = resolve_precision(cfg.train.mixed_precision.name, torch.cuda.is_available())
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
            return finished_drafter(self.out_dir, cfg, self.accelerator.is_main_process)
        return None

    # --- setup: one builder per component, in the order each needs the one before ---------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed)
        kind = drafter_kind(self.cfg.drafter.kind)
        self.objective = resolve_objective(kind, self.cfg.objective)  # a wrong objective fails before anything loads
        token_counts = self._setup_target_and_data()
        self.drafter = self._setup_drafter(kind, token_counts)
        self.feature_cache = self._setup_feature_source()
        self._setup_optimizer()
        # a resumed run continues from its own weights, loaded over init_from's
        self.start_step, self.history = resume(self.accelerator, self.out_dir, self.cfg, self.drafter.identity())
        self.tokens_trained = self.history[-1].get("tokens_trained", 0) if self.history else 0
        self._setup_logger()

    def _setup_target_and_data(self) -> torch.Tensor | None:
        """The frozen target, prep's dataset (checked against the target's tokenizer) and train.tau's prompts; returns
        the dataset's token counts (a kind may size its draft vocabulary by them)."""
        cfg = self.cfg
        tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
        self.dataset, token_counts = load_prepared_dataset(self.data_dir, tokenizer)
        model = load_target_model(cfg.target, cfg.cache_dir, device=self.accelerator.device)
        self.target = FrozenTarget(model)
        self.eos_token_ids = eos_token_ids(tokenizer, model)
        self.mask_token_id = tokenizer.mask_token_id
        self.tau_prompts = validation_prompts(self.dataset["validation"], cfg.train.tau_prompts)
        if cfg.train.tau_prompts and len(self.tau_prompts) < cfg.train.tau_prompts:
            log.warning("train.tau_prompts=%d: the validation split has %d record(s) long enough to prompt the "
                        "decoder (train/live_tau.py), so the decoded τ uses %d prompt(s)%s", cfg.train.tau_prompts,
                        len(self.tau_prompts), len(self.tau_prompts), "" if self.tau_prompts else " (it is not measured)")
        return token_counts

    def _setup_drafter(self, kind: Any, token_counts: torch.Tensor | None) -> nn.Module:
        """The drafter of `drafter.kind`, built for this target (and started from init_from's weights when set)."""
        cfg = self.cfg
        context = BuildContext(self.target, token_counts, str(cfg.target.name_or_path), cfg.target.revision,
                               self.mask_token_id)
        drafter = kind.model_class.build(OmegaConf.to_object(cfg.drafter), context)
        drafter.check_target(self.target, "drafter")
        if cfg.init_from is not None:
            drafter.load_initial_weights(Path(cfg.init_from).expanduser())
            log.info("drafter weights start from %s (init_from)", cfg.init_from)
        drafter = drafter.to(self.accelerator.device)
        self.tau_decoding = OmegaConf.to_object(cfg.train.tau)
        if self.tau_prompts:  # as eval does, refuse a draft deeper than the drafter makes, here before the first step
            check_draft_depth(drafter.max_depth, self.tau_decoding, "train.tau", type(drafter).__name__)
            check_tree_width(self.tau_decoding, self.target.config.vocab_size, "train.tau")
        log.info("drafter %s reads target layers %s; objective %s", kind.name, list(drafter.feature_layers),
                 type(self.objective).__name__)
        return drafter

    def _setup_feature_source(self) -> Any:
        """prep's feature cache when features.source=cache (the target's forward is then not run), else None."""
        cfg = self.cfg
        if cfg.features.source.name != "cache":
            return None
        from specdistill.distill.feature_cache import open_feature_cache

        path = Path(cfg.features.path).expanduser() if cfg.features.path else self.data_dir.parent / "features"
        return open_feature_cache(path, self.target, self.dataset, self.drafter.feature_layers, self.objective,
                                  self.data_dir)

    def _setup_optimizer(self) -> None:
        """AdamW and its schedule (train/optim.py); the loss module and optimizer wrapped for the distributed mode."""
        optimizer, self.scheduler, self.schedule = build_optimizer(self.drafter.parameters(), self.cfg.optim,
                                                                   self.cfg.train.max_steps)
        self.module, self.optimizer = self.accelerator.prepare(DraftTraining(self.drafter, self.objective), optimizer)
        from accelerate.utils import DistributedType

        # drafter.stop_head: its gradient-norm clip is its own, so the drafter trains exactly as without it (ZeRO and
        # FSDP clip every parameter together)
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        parameters = list(self.module.named_parameters())
        self.stop_head_parameters = [] if sharded else [p for name, p in parameters if "stop_head." in name]
        # sharded: None, i.e. every parameter, read at each clip: accelerate's FSDP clip finds its model by comparing
        # the list with model.parameters(); on CUDA (not on CPU) a list taken here held a plain Tensor where the model
        # later had a DTensor, and the comparison raised (where FSDP2 swaps it was not traced)
        self.clipped_parameters = None if sharded else [p for name, p in parameters if "stop_head." not in name]
        # the scheduler is not prepared: accelerate would step it once per process, and our schedule counts
        # optimizer steps
        self.accelerator.register_for_checkpointing(self.scheduler)

    def _setup_logger(self) -> None:
        cfg = self.cfg
        if cfg.logger.name != "none":
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            self.accelerator.init_trackers(cfg.logger.project, config=config,
                                           init_kwargs={cfg.logger.name: {"name": cfg.logger.run_name}})

    # --- train: the loop, and one optimizer step ------------------------------------------------------------------

    def train(self) -> dict:
        """Optimizer steps from start_step to train.max_steps: validation every eval_every steps (and at step 0, the
        untrained baseline), a log line every log_every, a checkpoint every checkpoint_every and at the last step."""
        cfg, accelerator, loop = self.cfg, self.accelerator, self.cfg.train
        batches = self._micro_batches("train", loop.batch_size, self.start_step * loop.grad_accum)
        progress = tqdm(range(self.start_step, loop.max_steps), initial=self.start_step, total=loop.max_steps,
                        desc="train", unit="step", disable=not accelerator.is_main_process)
        if self.start_step == 0:  # the untrained drafter's agreement: the baseline every later value is read against
            self.history.append({"step": 0, **self.validate()})
        window_start_tokens, window_start = self.tokens_trained, time.perf_counter()
        self.first_step_records, self.records_seen = [], set()
        for step in progress:
            drawn = [next(batches) for _ in range(loop.grad_accum)]
            self._note_records(step, drawn)
            record, agreement = self.train_step(step, drawn)
            if (step + 1) % loop.eval_every == 0 or step + 1 == loop.max_steps:
                record.update(self.validate())
            self.history.append(record)
            if (step + 1) % loop.log_every == 0 or "val_top1" in record:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = (self.tokens_trained - window_start_tokens) / max(elapsed, 1e-9)
                window_start_tokens, window_start = self.tokens_trained, time.perf_counter()
                shown = {"loss": f"{record['loss']:.3f}", "tau_proxy": f"{expected_accept_length(agreement):.2f}"}
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

    def train_step(self, step: int, drawn: list[dict[str, torch.Tensor]]) -> tuple[dict, list[float]]:
        """One optimizer step over the micro-batches drawn for it (gradient accumulation): the step's record and the
        training top-1 agreement per draft position."""
        accelerator, grad_accum = self.accelerator, self.cfg.train.grad_accum
        micro = [self._prepare(batch, step, index) for index, batch in enumerate(drawn)]
        # positions trained on in the whole step, over every process: the per-token normaliser
        step_tokens = sum(self.drafter.trained_rows(batch["loss_mask"]).sum() for batch in micro)
        step_tokens = accelerator.reduce(step_tokens.float(), reduction="sum").clamp(min=1)
        loss_total, local_tokens, agree, counted = 0.0, 0, 0, 0
        stop_total, stop_rows = 0.0, 0.0  # the stop head's BCE (drafter.stop_head) and the rows it was scored on
        self.module.train()
        for batch in micro:
            target_output = self._target_output(batch, "train", for_training=True)
            # accumulate: gradients are synchronised (DeepSpeed: stepped) on the step's last micro-batch only
            with accelerator.accumulate(self.module):
                loss = self.module(batch, target_output)
                # accelerate (or DeepSpeed) divides by grad_accum and the processes' gradients are averaged:
                # scale back up so the step's gradient is a per-token mean
                # the stop head reads detached features: its BCE trains it alone, the drafter's gradient is unchanged
                trained = loss.loss_sum if loss.stop_loss_sum is None else loss.loss_sum + loss.stop_loss_sum
                accelerator.backward(trained * accelerator.num_processes * grad_accum / step_tokens)
            loss_total += loss.loss_sum.item()
            if loss.stop_loss_sum is not None:
                stop_total, stop_rows = stop_total + loss.stop_loss_sum.item(), stop_rows + loss.counted.sum().item()
            agree, counted = agree + loss.agree, counted + loss.counted
            local_tokens += int(batch["attention_mask"].sum())
        totals = accelerator.reduce(torch.tensor([loss_total, local_tokens, stop_total, stop_rows],
                                                 device=accelerator.device), "sum")
        loss_value = totals[0].item() / step_tokens.item()
        clipped = self.module.parameters() if self.clipped_parameters is None else self.clipped_parameters
        grad_norm = accelerator.clip_grad_norm_(clipped, self.cfg.optim.grad_clip_norm)
        if self.stop_head_parameters:
            torch.nn.utils.clip_grad_norm_(self.stop_head_parameters, self.cfg.optim.grad_clip_norm)
        self._stop_if_diverged(step + 1, loss_value, float(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.tokens_trained += int(totals[1].item())  # every process's tokens
        agreement = (agree / counted.clamp(min=1)).tolist()
        record = {"step": step + 1, "tokens_trained": self.tokens_trained, "loss": loss_value,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "train_top1": agreement[0]}
        if totals[3].item():
            record["stop_bce"] = totals[2].item() / totals[3].item()  # mean BCE per scored draft row
        return record, agreement

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

    # --- data and the target's side of each micro-batch ---------------------------------------------------------

    def _micro_batches(self, split: str, batch_size: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of each global micro-batch, on its device. Training batches are grouped by length
        (train.group_by_length); validation's are not, so the eval_batches it reads are a fair sample."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rows = self.dataset[split]
        lengths = row_lengths(rows) if split == "train" and self.cfg.train.group_by_length else None
        for indices in micro_batch_indices(len(rows), batch_size * world, self.cfg.seed, start, lengths):
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

    # --- validation, and save ----------------------------------------------------------------------------------------

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
