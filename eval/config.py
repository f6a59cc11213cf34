"""The `specdistill eval` schema (checked by Hydra: a misspelled key fails at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from specdistill.distill.config import StageConfig
from specdistill.distill.decoding import DecodingConfig, Ranges, check_decoding, check_ranges
from specdistill.eval.benches import BenchConfig


class LongPrompts(Enum):
    error = "error"
    skip = "skip"


class Selection(Enum):
    """Several drafters: each decodes alone (a row each); hedge adds a row drafting with the online leader among
    them (distill/selection.py, HedgeSpec)."""

    none = "none"
    hedge = "hedge"


class Adaptation(Enum):
    """online: one more row, decoding the prompts in order with a copy of the drafter that trains on each decoded turn
    (distill/adaptation.py, OnlineSpec / OSD), then the held-out prompts with the adapted drafter frozen."""

    none = "none"
    online = "online"


@dataclass
class EvalLoopConfig(DecodingConfig):
    """`eval.*`: the decoding settings (distill/decoding.py's DecodingConfig, the decoder takes this whole) and what
    eval adds: which prompts, warm-up, the lossless check, the transformers baselines."""

    num_prompts: Optional[int] = 80  # the first N prompts of the bench (null: all)
    warmup_prompts: int = 2  # decoded untimed before measuring
    verify_lossless: Optional[bool] = None  # re-decode greedily without the drafter and compare; null: on for bench=toy
    # greedy: also transformers' plain `generate` on the same prompts (its row; each drafter's speedup_over_transformers)
    # and, with token-level drafters, its assisted generation and prompt lookup
    hf_baselines: bool = True
    # transformers' baselines decode only this many of the prompts, spread evenly over them (so an ordered bench's
    # categories alike: MT-Bench's 80 → 2 per category at 16); their rows and each drafter's speedup_over_transformers
    # are measured on those prompts, beside ours on the same ones. null: all (a third full decoding pass: on the
    # 2-core EPYCs measured `generate` ran at about half our plain decoding's speed, the eval's longest pass)
    hf_baseline_prompts: Optional[int] = None
    # a prompt whose decoding would read positions past the target's context window (max_position_embeddings): error
    # refuses the run naming it; skip leaves it out, counted in report.json's skipped_prompts and the log
    long_prompts: LongPrompts = LongPrompts.error
    selection: Selection = Selection.none  # hedge: also decode with online drafter selection among drafter_path's
    hedge_prior_steps: float = 16.0  # hedge: a prompt starts from the stream's mean losses worth this many steps
    hedge_score_every: int = 4  # hedge: the drafters not leading commit (and are scored) every this many steps
    adaptation: Adaptation = Adaptation.none  # online: + a row whose drafter trains on the stream as it decodes
    adaptation_lr: float = 1e-4  # online: AdamW's learning rate (constant)
    adaptation_steps: int = 1  # online: optimizer steps on each decoded turn
    adaptation_held_out: float = 0.25  # online: the last fraction of the prompts, decoded with the adapted drafter frozen


@dataclass
class EvalConfig(StageConfig):
    drafter_path: Any = MISSING  # a drafter folder, or a list of them for one side-by-side report
    bench: BenchConfig = field(default_factory=BenchConfig)
    eval: EvalLoopConfig = field(default_factory=EvalLoopConfig)


# eval's own ranges, beside the decoding settings' (distill/decoding.py DECODING_RANGES)
EVAL_RANGES: Ranges = {
    "num_prompts": (lambda v: v is None or v >= 1, "an integer ≥ 1, or null for the whole bench"),
    "hedge_prior_steps": (lambda v: v >= 0, "a number ≥ 0 (0: every prompt's weights start afresh)"),
    "hedge_score_every": (lambda v: v >= 1, "an integer ≥ 1 (1: every drafter commits and is scored every step)"),
    "warmup_prompts": (lambda v: v >= 0, "an integer ≥ 0"),
    "hf_baseline_prompts": (lambda v: v is None or v >= 1, "an integer ≥ 1, or null for every prompt"),
    "adaptation_lr": (lambda v: v > 0, "a number > 0"),
    "adaptation_steps": (lambda v: v >= 1, "an integer ≥ 1"),
    "adaptation_held_out": (lambda v: 0 <= v < 1, "a fraction in [0, 1) of the prompts"),
}


def check_loop_ranges(loop: DictConfig | EvalLoopConfig) -> None:
    """Raise a UserError naming the first `eval.*` key outside its valid range (checked before anything loads): the
    decoding settings by distill's one check, then eval's own."""
    check_decoding(loop, "eval")
    check_ranges(loop, "eval", EVAL_RANGES)


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
