"""The `specdistill eval` schema (checked by Hydra: a misspelled key fails at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from specdistill.data_prep.config import StageConfig
from specdistill.data_prep.config import register_configs as register_data_configs
from specdistill.eval.benches import BenchConfig


class Method(Enum):
    chain = "chain"
    tree = "tree"


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


@dataclass
class EvalConfig(StageConfig):
    drafter_path: Any = MISSING  # a drafter folder, or a list of them for one side-by-side report
    bench: BenchConfig = field(default_factory=BenchConfig)
    eval: EvalLoopConfig = field(default_factory=EvalLoopConfig)


def register_configs() -> None:
    register_data_configs()
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
