"""The learning-rate schedule every training loop here uses (train/'s drafter training, distill/toy.py's toy target)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (from 0): a linear warm-up over `warmup`
    steps, then a `cosine` or `linear` decay that reaches `floor` at step `total` (`constant`: 1 after the warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0
