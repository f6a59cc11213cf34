"""Schema of `specdistill train` (conf/train.yaml), registered in Hydra's ConfigStore."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from specdistill.distill.config import StageConfig
from specdistill.distill.decoding import DecodingConfig, check_decoding
from specdistill.distill.errors import UserError
from specdistill.train.distributed import DistributedConfig


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class MixedPrecision(Enum):
    auto = "auto"  # bf16 on GPU, none on CPU
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class OptimConfig:
    lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 2000  # linear warm-up length, unless warmup_ratio is set
    warmup_ratio: Optional[float] = None  # warm-up as a fraction of train.max_steps; when set, it decides the warm-up
    schedule: Schedule = Schedule.cosine
    min_lr_ratio: float = 0.0  # the schedule decays to lr × min_lr_ratio
    grad_clip_norm: float = 0.5


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "specdistill"
    run_name: Optional[str] = None


@dataclass
class LoopConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    max_length: int = 2048  # longer sequences are truncated
    # training micro-batches of similar lengths (train/data.py epoch_order): less padding computed, the same data
    group_by_length: bool = True
    mixed_precision: MixedPrecision = MixedPrecision.auto
    eval_every: int = 200
    eval_batches: int = 20  # validation micro-batches per evaluation
    # τ by the real decoder at every evaluation, on the prompts of this many validation records (the tokens before
    # their first trained token); 0: only the top-1 proxy
    tau_prompts: int = 8
    # how it decodes them: eval's decoding settings (chain, γ = 5, greedy), with fewer new tokens per prompt
    tau: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=64))
    checkpoint_every: int = 500
    keep_last: int = 2  # newest checkpoints kept (at least one)
    log_every: int = 10


class FeatureSource(Enum):
    online = "online"  # the frozen target runs in every step
    cache = "cache"  # read from the cache `specdistill prep features.cache=true` wrote (distill/feature_cache.py)


@dataclass
class FeatureSourceConfig:
    """Where the target's features and logits come from while training."""

    source: FeatureSource = FeatureSource.online
    path: Optional[str] = None  # the cache folder (source=cache); None: <data_dir>/../features, where prep writes it


@dataclass
class TrainConfig(StageConfig):
    data_dir: str = MISSING  # a `specdistill prep` output folder (…/dataset)
    # the drafter kind's own options dataclass (distill/drafters/<kind>.py), chosen by drafter=<kind>
    drafter: Any = MISSING
    # the loss: one of the schemas in distill/objectives.py, chosen by objective=<name> (default: the drafter's own);
    # null: the drafter kind's default objective
    objective: Any = None
    # a drafter folder whose weights start this run (e.g. HASS stage B from stage A); the new run's drafter must have
    # the same shape and target
    init_from: Optional[str] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    features: FeatureSourceConfig = field(default_factory=FeatureSourceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # distributed=ddp|zero2|zero3|fsdp
    # auto: continue the run in out_dir (same settings) from its newest checkpoint; never: start a new run, refused
    # when out_dir already holds one
    resume: str = "auto"


# train.* keys that count something the run cannot do zero times of (the schema's int admits 0 and negatives)
POSITIVE_LOOP_KEYS = ("max_steps", "batch_size", "grad_accum", "max_length", "eval_every", "eval_batches",
                      "checkpoint_every", "log_every")


def check_ranges(cfg: Any) -> None:
    """Refuse values the schema's types admit but training cannot use, naming the key, before anything loads (train
    and `specdistill run` call it)."""
    loop, optim = cfg.train, cfg.optim
    for key in POSITIVE_LOOP_KEYS:
        if loop[key] < 1:
            raise UserError(f"train.{key}={loop[key]} must be at least 1")
    if loop.tau_prompts < 0:
        raise UserError(f"train.tau_prompts={loop.tau_prompts} is negative; 0 turns the decoded τ off")
    check_decoding(loop.tau, "train.tau")
    if not 0 < optim.lr < math.inf:
        raise UserError(f"optim.lr={optim.lr} must be a positive learning rate, e.g. optim.lr=3e-4")
    if not 0 < optim.grad_clip_norm < math.inf:
        raise UserError(f"optim.grad_clip_norm={optim.grad_clip_norm} must be positive (a large value barely clips)")
    if optim.weight_decay < 0:
        raise UserError(f"optim.weight_decay={optim.weight_decay} is negative; use 0 for none")
    if len(optim.betas) != 2 or not all(0 <= beta < 1 for beta in optim.betas):
        raise UserError(f"optim.betas={list(optim.betas)} must be two values in [0, 1), e.g. [0.9, 0.95]")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1] (a fraction of optim.lr)")


def register_configs() -> None:
    # each drafter kind stores its options schema (`schema/drafter/<kind>`, which conf/drafter/<kind>.yaml starts
    # from) and the objective schemas it trains with (`schema/objective/<name>`, which conf/objective/*.yaml start from)
    import specdistill.distill.drafters  # noqa: F401

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
