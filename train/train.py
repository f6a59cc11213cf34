"""specdistill train: distill an EAGLE-style drafter from the frozen target, online (the target runs in the loop).

    specdistill train target=toy drafter=eagle3 data_dir=outputs/prep/<date>/<time>/dataset
    specdistill train target=toy drafter=eagle1 data_dir=... train.max_steps=1400 optim.lr=1e-3 optim.warmup_steps=50
    specdistill train ... logger=wandb                                   # WANDB_MODE=offline logs locally
    torchrun --nproc_per_node 2 -m specdistill.train data_dir=...                    # DDP (one process per GPU, or gloo on CPU)

setup (target, data, drafter, optimizer, resume) → train (accumulated steps, validation, checkpoints) → save:

    <out_dir>/drafter/          save_pretrained (safetensors) + resolved_config.yaml + summary.json
    <out_dir>/checkpoints/step_N   accelerate state + trainer_state.json; resume=auto continues from the newest

Gradient accumulation is normalised per token: every micro-batch's summed loss is divided by the number of
trained positions in the whole optimizer step (all micro-batches, all processes), so a step's gradient does not
depend on how the tokens were split into micro-batches.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from specdistill.conf import CONFIG_DIR
from specdistill.data_prep.targets import load_target_model, load_target_tokenizer, tokenizer_fingerprint
from specdistill.distill.drafters import ObjectiveWeights, build_eagle_drafter, default_eagle3_layers, trained_rows
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.objectives import expected_accept_length
from specdistill.distill.target import FrozenTarget, check_feature_layers
from specdistill.train.config import register_configs

log = logging.getLogger("specdistill.train")
CHECKPOINT_PREFIX = "step_"


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
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    expected = stats.get("tokenizer", {}).get("fingerprint")
    if expected is not None and expected != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"data_dir: {data_dir} was prepared with another tokenizer ({stats['tokenizer'].get('name_or_path')}) "
            "than this target's. Run `specdistill prep` again with this target."
        )
    if "train" not in dataset or len(dataset["train"]) == 0:
        raise UserError(f"data_dir: {data_dir} has no training records; check its stats.json for why prep dropped them")
    counts_path = data_dir / "token_counts.safetensors"
    counts = load_file(str(counts_path))["counts"] if counts_path.exists() else None
    return dataset, counts


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

    def __init__(self, drafter: nn.Module, weights: ObjectiveWeights):
        super().__init__()
        self.drafter, self.weights = drafter, weights

    def forward(self, batch: dict[str, torch.Tensor], target_output: Any):
        return self.drafter.training_loss(
            batch["input_ids"], batch["attention_mask"], batch["loss_mask"], target_output, self.weights
        )


def lr_lambda(cfg: Any, max_steps: int):
    """Linear warm-up, then cosine / linear decay to lr × min_lr_ratio (or constant)."""
    warmup, floor, schedule = cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule.name

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its trainer_state.json exists)."""
    folder = out_dir / "checkpoints"
    found = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if (path / "trainer_state.json").exists()]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator: Any, out_dir: Path, step: int, keep_last: int, history: list[dict], drafter: dict
) -> None:
    final = out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    if accelerator.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, "history": history, "drafter": drafter}))
        staging.rename(final)
        for old in checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# The recipe


class TrainRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir).expanduser()

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        precision = cfg.train.mixed_precision.name
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(
            mixed_precision=precision,
            log_with=None if cfg.logger.name == "none" else cfg.logger.name,
            cpu=not torch.cuda.is_available(),  # without it, processes on a CPU-only machine never join one group
        )
        set_seed(cfg.seed)
        data_dir = Path(cfg.data_dir).expanduser()
        if not data_dir.exists():
            raise UserError(f"data_dir: {data_dir} does not exist; point it at the dataset folder `specdistill prep` wrote")

        tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
        self.dataset, token_counts = load_prepared_dataset(data_dir, tokenizer)
        model = load_target_model(cfg.target, cfg.cache_dir, device=self.accelerator.device)
        num_layers = model.config.num_hidden_layers
        kind = cfg.drafter.kind.name
        feature_layers = list(
            cfg.drafter.feature_layers
            or ([-1] if kind == "eagle1" else cfg.target.eagle3_layers or default_eagle3_layers(num_layers))
        )
        check_feature_layers(feature_layers, num_layers)
        log.info("drafter %s reads target layers %s", kind, feature_layers)
        self.target = FrozenTarget(model, feature_layers)
        drafter = build_eagle_drafter(
            kind, self.target, cfg.drafter.num_layers, feature_layers, cfg.drafter.draft_vocab_size, token_counts
        ).to(self.accelerator.device)
        drafter.config.target_name_or_path = cfg.target.name_or_path
        drafter.config.target_revision = cfg.target.revision
        self.drafter = drafter

        objective = cfg.objective
        self.weights = ObjectiveWeights(
            feature=objective.feature_weight, token=objective.token_weight, noise=objective.noise,
            ttt_steps=objective.ttt_steps, ttt_decay=objective.ttt_decay,
        )
        optimizer = torch.optim.AdamW(
            [p for p in drafter.parameters() if p.requires_grad], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
        self.module, self.optimizer = self.accelerator.prepare(DraftTraining(drafter, self.weights), optimizer)
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
        if self.cfg.resume == "never":
            return 0, []
        if self.cfg.resume != "auto":
            raise UserError(f"resume: '{self.cfg.resume}' is not one of auto, never")
        found = checkpoints(self.out_dir)
        if not found:
            return 0, []
        state = json.loads((found[-1] / "trainer_state.json").read_text())
        self._check_checkpoint_drafter(found[-1], state.get("drafter", {}))
        self.accelerator.load_state(str(found[-1]))
        log.info("resumed from %s (step %d)", found[-1], state["step"])
        return state["step"], state["history"]

    def _drafter_identity(self) -> dict:
        config = self.drafter.config
        return {"model_type": config.model_type, "feature_layers": list(config.feature_layers),
                "num_hidden_layers": config.num_hidden_layers, "draft_vocab_size": config.draft_vocab_size,
                "vocab_size": config.vocab_size, "target_hidden_size": config.target_hidden_size,
                "target_num_layers": config.target_num_layers, "target_name_or_path": config.target_name_or_path}

    def _check_checkpoint_drafter(self, path: Path, saved: dict) -> None:
        """A checkpoint of another target or drafter shape cannot be resumed: say so before loading it."""
        current = self._drafter_identity()
        different = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if different:
            details = ", ".join(f"{key} {old!r} there vs {new!r} now" for key, (old, new) in different.items())
            raise UserError(
                f"resume: the checkpoint {path} is of another drafter or target ({details}). "
                "Use a new out_dir, set resume=never to start over, or match the original config."
            )

    def _micro_batches(self, split: str, batch_size: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's share of each global micro-batch, on its device."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rows = self.dataset[split]
        for indices in micro_batch_indices(len(rows), batch_size * world, self.cfg.seed, start):
            mine = indices[rank::world] or indices[:1]
            batch = collate([rows[i] for i in mine], self.cfg.train.max_length)
            yield {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def train(self) -> dict:
        cfg, accelerator = self.cfg, self.accelerator
        loop = cfg.train
        batches = self._micro_batches("train", loop.batch_size, self.start_step * loop.grad_accum)
        progress = tqdm(range(self.start_step, loop.max_steps), initial=self.start_step, total=loop.max_steps,
                        desc="train", unit="step", disable=not accelerator.is_main_process)
        if self.start_step == 0:  # the untrained drafter's agreement: the baseline every later value is read against
            self.history.append({"step": 0, **self.validate()})
        window_tokens, window_start = 0, time.perf_counter()
        for step in progress:
            micro = [next(batches) for _ in range(loop.grad_accum)]
            # positions trained on in the whole step, over every process: the per-token normaliser
            step_tokens = sum(trained_rows(batch["loss_mask"]).sum() for batch in micro)
            step_tokens = accelerator.reduce(step_tokens.float(), reduction="sum").clamp(min=1)
            loss_total, local_tokens, agree, counted = 0.0, 0, 0, 0
            self.module.train()
            for index, batch in enumerate(micro):
                target_output = self.target(batch["input_ids"], batch["attention_mask"], for_training=True)
                sync = index == len(micro) - 1
                with accelerator.no_sync(self.module) if not sync else nullcontext():
                    loss = self.module(batch, target_output)
                    # DDP averages gradients over processes; scale back up so the step is a per-token mean
                    accelerator.backward(loss.loss_sum * accelerator.num_processes / step_tokens)
                loss_total += loss.loss_sum.item()
                agree, counted = agree + loss.agree, counted + loss.counted
                local_tokens += int(batch["attention_mask"].sum())
            grad_norm = accelerator.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            totals = accelerator.reduce(torch.tensor([loss_total, local_tokens], device=accelerator.device), "sum")
            loss_value = totals[0].item() / step_tokens.item()
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
                progress.set_postfix(loss=f"{loss_value:.3f}", tau_proxy=f"{expected_accept_length(agreement):.2f}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step + 1)
            if (step + 1) % loop.checkpoint_every == 0 and step + 1 < loop.max_steps:
                save_checkpoint(accelerator, self.out_dir, step + 1, loop.keep_last, self.history, self._drafter_identity())
        return self.history[-1] if self.history else {}

    @torch.no_grad()
    def validate(self) -> dict:
        """Top-1 agreement with the target at every training-time-test step on the validation split (no noise)."""
        if len(self.dataset["validation"]) == 0:
            return {}
        self.module.eval()
        weights = ObjectiveWeights(**{**self.weights.__dict__, "noise": 0.0})
        agree = counted = 0
        batches = self._micro_batches("validation", self.cfg.train.batch_size, 0)
        global_batch = self.cfg.train.batch_size * self.accelerator.num_processes
        for _ in range(min(self.cfg.train.eval_batches, batches_per_epoch(len(self.dataset["validation"]), global_batch))):
            batch = next(batches)
            target_output = self.target(batch["input_ids"], batch["attention_mask"])
            loss = self.drafter.training_loss(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                              target_output, weights)
            agree, counted = agree + loss.agree, counted + loss.counted
        agree = self.accelerator.reduce(agree, "sum")
        counted = self.accelerator.reduce(counted, "sum")
        per_step = (agree / counted.clamp(min=1)).tolist()
        metrics = {"val_top1": per_step[0], "val_tau_proxy": expected_accept_length(per_step)}
        metrics.update({f"val_top1_step{step}": value for step, value in enumerate(per_step)})
        return metrics

    def save(self, final_metrics: dict) -> Path:
        """The drafter (save_pretrained, safetensors), the resolved config and a summary, renamed into place."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        final = self.out_dir / "drafter"
        if accelerator.is_main_process:
            staging = self.out_dir / ".drafter.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            accelerator.unwrap_model(self.module).drafter.save_pretrained(staging, safe_serialization=True)
            (staging / "resolved_config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            (staging / "summary.json").write_text(json.dumps({"final": final_metrics, "history": self.history}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            print(f"train: step {final_metrics.get('step')}: loss {final_metrics.get('loss', float('nan')):.4f}, "
                  f"validation top-1 {final_metrics.get('val_top1', float('nan')):.3f}\ntrain: wrote {final}")
        accelerator.wait_for_everyone()  # no process tears the group down while the drafter is being written
        accelerator.end_training()
        return final


def train(cfg: DictConfig) -> Path:
    recipe = TrainRecipe(cfg)
    recipe.setup()
    return recipe.save(recipe.train())


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
