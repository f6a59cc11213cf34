"""Schema of `specdistill train` (conf/train.yaml), registered in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from specdistill.data_prep.config import StageConfig, register_configs as register_data_configs


class DrafterKind(Enum):
    eagle1 = "eagle1"
    eagle3 = "eagle3"


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
class DrafterConfig:
    kind: DrafterKind = MISSING
    num_layers: int = 1  # decoder layers in the drafter
    # target layer ids read (input of layer i; -1: final normed state); None: target.eagle3_layers, else [2, L/2, L−3]
    feature_layers: Optional[list[int]] = None
    draft_vocab_size: Optional[int] = None  # EAGLE-3: most frequent masked tokens; None: full vocabulary


@dataclass
class ObjectiveConfig:
    feature_weight: float = 1.0  # SmoothL1 feature regression (EAGLE-1)
    token_weight: float = 0.1  # soft cross-entropy against the target
    noise: float = 0.1  # uniform feature noise amplitude
    ttt_steps: int = 1  # unrolled training-time-test steps (EAGLE-3)
    ttt_decay: float = 0.8


@dataclass
class OptimConfig:
    lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 2000
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
    mixed_precision: MixedPrecision = MixedPrecision.auto
    eval_every: int = 200
    eval_batches: int = 20  # validation micro-batches per evaluation
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10


@dataclass
class TrainConfig(StageConfig):
    data_dir: str = MISSING  # a `specdistill prep` output folder (…/dataset)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    resume: str = "auto"  # auto: continue from the newest checkpoint in out_dir; never: start over


def register_configs() -> None:
    register_data_configs()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
