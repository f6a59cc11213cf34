"""The optimizer and its learning-rate schedule (`optim`): AdamW over the drafter's trainable weights, a linear
warm-up (optim.warmup_steps, or optim.warmup_ratio × train.max_steps), then cosine / linear decay to
lr × min_lr_ratio by train.max_steps, or constant (distill/schedule.py `lr_factor`)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch

from specdistill.distill.errors import UserError
from specdistill.distill.schedule import lr_factor

log = logging.getLogger("specdistill.train")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim: Any,
                    max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, dict]:
    """(AdamW over the parameters that train, its LambdaLR schedule, the schedule as recorded in summaries)."""
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay)
    schedule = announce_schedule(optim, max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, max_steps)), schedule


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
