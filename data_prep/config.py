"""The `specdistill prep` schema (the data it reads and how), registered in Hydra's ConfigStore.

Each primary config in `conf/` starts from its stage's schema (`defaults: [<stage>_schema, ...]`), so group files
and command-line overrides are merged onto typed dataclasses: an unknown or misspelled key, or a value of the wrong
type, fails at start with a message naming the key. Enum fields list their valid values in that message. The keys
every stage shares (`target`, `out_dir`, `cache_dir`, `seed`) are in `distill/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from specdistill.distill.config import StageConfig


class DataFormat(Enum):
    auto = "auto"  # detect each record's form from its fields
    sharegpt = "sharegpt"  # {"conversations": [{"from": "human"|"gpt"|"system", "value": str}]}
    messages = "messages"  # {"messages": [{"role": "user"|"assistant"|"system", "content": str}]}
    alpaca = "alpaca"  # {"instruction": str, "input": str, "output": str}: one user turn, one assistant turn
    text = "text"  # {"text": str}, every token is trained on


# skip: count and report malformed records and keep going; raise: the first malformed record is fatal.
# (Functional form because `raise` is a keyword; OmegaConf matches enum values by member name.)
OnError = Enum("OnError", [("skip", "skip"), ("raise", "raise")])


# generic second-turn requests of the kinds chat benchmarks ask (rewrite, shorten, explain, give an example, critique)
FOLLOW_UP_QUESTIONS = (
    "Can you explain that in simpler terms?",
    "Please summarize your answer in two sentences.",
    "Rewrite your previous answer as a numbered list.",
    "Can you give a concrete example?",
    "Now rewrite your answer in a more formal tone.",
    "What are the weaknesses of your answer? Give an improved version.",
    "Make your answer shorter and give it a title.",
    "Explain your answer as if I were ten years old.",
)


@dataclass
class RegenerateConfig:
    """Sampling settings for replacing assistant turns with the target's own responses."""

    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts decoding together (a finished reply leaves the batch)
    # replies sampled per conversation (temperature > 0): each is a training record, and all of one conversation's
    # replies fall in the same split, so validation never scores a prompt the drafter trained on
    samples: int = 1
    # follow-up user turns appended to every conversation that ends with a reply, each answered by the target in
    # turn, so the drafter also learns later turns (MT-Bench asks two); each is drawn from follow_up_questions by the
    # run's seed and the record
    follow_ups: int = 0
    follow_up_questions: list[str] = field(default_factory=lambda: list(FOLLOW_UP_QUESTIONS))


@dataclass
class DataConfig:
    path: str = MISSING  # Hub dataset name, local .jsonl/.json/.parquet file, datasets folder, or builtin:toy_chat
    # the command that places a preset's local data.path (data=alpaca: `specdistill setup`), named when it is missing
    setup_command: Optional[str] = None
    format: DataFormat = DataFormat.auto
    split: str = "train"  # split to read from a Hub dataset or a data-files folder
    subset: Optional[str] = None  # Hub dataset configuration name
    data_files: Optional[str] = None  # a file (or glob) inside a Hub dataset repository
    revision: Optional[str] = None
    max_length: int = 2048  # tokens; longer conversations are truncated
    max_records: Optional[int] = None  # read at most this many records (None: all)
    validation_fraction: float = 0.05
    on_error: OnError = OnError.skip
    regenerate: bool = False
    regen: RegenerateConfig = field(default_factory=RegenerateConfig)


class CacheDType(Enum):
    bf16 = "bf16"
    fp8 = "fp8"  # float8_e4m3fn with a bfloat16 scale per row (row amax / 448)
    fp32 = "fp32"  # exact: training from it equals online training


@dataclass
class FeatureCacheConfig:
    """The offline feature cache (data_prep/features.py): the target runs once over the dataset, and
    `specdistill train features.source=cache` reads what the drafters' losses need instead of running it."""

    cache: bool = False  # write <out_dir>/features after the dataset
    # target layer ids to cache (-1: the final normed state); None: every layer a registered drafter kind reads of this
    # target with its default options (e.g. EAGLE-3's taps for the target's depth, and -1 for EAGLE-1 / FSPAD / Medusa)
    layers: Optional[list[int]] = None
    dtype: CacheDType = CacheDType.bf16
    shard_records: int = 64  # records per shard file (a re-run skips finished shards)
    batch_size: int = 8  # records per target forward


@dataclass
class PrepConfig(StageConfig):
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


def register_configs() -> None:
    """Register the stage schemas so primary configs can name them in their defaults list."""
    config_store = ConfigStore.instance()
    config_store.store(name="prep_schema", node=PrepConfig)
