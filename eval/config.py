"""The `specdistill eval` schema (checked by Hydra: a misspelled key fails at start)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from specdistill.distill.config import StageConfig
from specdistill.distill.errors import UserError
from specdistill.eval.benches import BenchConfig


class Method(Enum):
    chain = "chain"
    tree = "tree"


class LongPrompts(Enum):
    error = "error"
    skip = "skip"


@dataclass
class EvalLoopConfig:
    method: Method = Method.chain
    gamma: int = 5  # chain: drafted tokens per step
    tree_depth: int = 6  # tree (EAGLE-2): draft levels
    tree_top_k: int = 10  # tree: children per expanded node, nodes expanded per level
    tree_total_tokens: int = 60  # tree: verified tokens per step, root included
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    num_prompts: Optional[int] = 80  # the first N prompts of the bench (null: all)
    warmup_prompts: int = 2  # decoded untimed before measuring
    verify_lossless: Optional[bool] = None  # re-decode greedily without the drafter and compare; null: on for bench=toy
    hf_baselines: bool = True  # token-level drafters: also transformers' assisted generation and prompt lookup
    # a prompt whose decoding would read positions past the target's context window (max_position_embeddings): error
    # refuses the run naming it; skip leaves it out, counted in report.json's skipped_prompts and the log
    long_prompts: LongPrompts = LongPrompts.error


@dataclass
class EvalConfig(StageConfig):
    drafter_path: Any = MISSING  # a drafter folder, or a list of them for one side-by-side report
    bench: BenchConfig = field(default_factory=BenchConfig)
    eval: EvalLoopConfig = field(default_factory=EvalLoopConfig)


# key under `eval.` → (the test a valid value passes, the valid range in words). Out-of-range values otherwise end
# deep in decoding (an empty reshape, a division by zero, NaN probabilities) or, for a negative temperature, silently
# decode greedily.
LOOP_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "gamma": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_depth": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_top_k": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_total_tokens": (lambda v: v >= 2, "an integer ≥ 2 (the root and at least one drafted token)"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": (lambda v: v >= 1, "an integer ≥ 1"),
    "num_prompts": (lambda v: v is None or v >= 1, "an integer ≥ 1, or null for the whole bench"),
    "warmup_prompts": (lambda v: v >= 0, "an integer ≥ 0"),
}


def check_loop_ranges(loop: DictConfig | EvalLoopConfig) -> None:
    """Raise a UserError naming the first `eval.*` key outside its valid range (checked before anything loads)."""
    for key, (valid, valid_range) in LOOP_RANGES.items():
        value = getattr(loop, key)
        if not valid(value):
            raise UserError(f"eval.{key}={value} is out of range: it must be {valid_range}")


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
