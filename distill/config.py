"""Config schemas every stage shares: the frozen target and the keys each stage has.

Each stage's schema (`data_prep/config.py`, `train/config.py`, `eval/config.py`) extends `StageConfig`; Hydra merges
group files and command-line overrides onto these typed dataclasses, so an unknown key or a value of the wrong type
fails at start with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from specdistill.distill.toy import ToyTargetConfig

# conf/ (YAML only) sits beside distill/ both in a checkout and in an installed copy (specdistill/conf)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# where built artefacts (the toy target, …) are cached: $SPECDISTILL_CACHE, else DEFAULT_CACHE_DIR
CACHE_ENV, DEFAULT_CACHE_DIR = "SPECDISTILL_CACHE", "~/.cache/specdistill"
CACHE_DIR = f"${{oc.env:{CACHE_ENV},'{DEFAULT_CACHE_DIR}'}}"  # the same, as every schema's `cache_dir` default


class DType(Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ToyTarget(ToyTargetConfig):
    """The built-in toy target (`target=toy`, `target=toy_tiny`): its build settings and the values it loads with.

    It is the target only while `target.name_or_path` is `name`: a user's own `target.name_or_path` drops this whole
    block, so none of the toy's values (its dtype, its build) reach the user's model. (Which layers a drafter taps is
    the drafter kind's option, its default derived from the target's depth: distill/drafters/<kind>.py.)
    """

    name: str = "toy"  # the target.name_or_path that selects this toy
    dtype: DType = DType.float32  # what target.dtype=auto means for the toy


@dataclass
class TargetConfig:
    """The frozen target: a Hub name or local folder, or the built-in toy target when `toy` is set and named."""

    name_or_path: str = MISSING
    dtype: DType = DType.auto  # auto: the toy's own dtype; any other target bfloat16 on GPU, float32 on CPU
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2 (None: transformers' default)
    trust_remote_code: bool = False  # only turn on for repositories you trust
    chat_template: Optional[str] = None  # a Jinja template string that replaces the tokenizer's own
    # a llama.cpp .gguf file: a path, or a file name in the name_or_path folder or Hub repository (distill/gguf.py)
    gguf_file: Optional[str] = None
    # with gguf_file: load name_or_path from the Hub when it can be reached, the GGUF only otherwise
    prefer_hub: bool = False
    toy: Optional[ToyTarget] = None  # set by target=toy / target=toy_tiny; used only while name_or_path is toy.name


@dataclass
class StageConfig:
    """Keys every stage has."""

    target: TargetConfig = field(default_factory=TargetConfig)
    out_dir: str = "${hydra:runtime.output_dir}"  # where this stage writes
    # write into an out_dir that holds files this stage did not write (distill/outputs.py: check_out_dir)
    overwrite: bool = False
    cache_dir: str = CACHE_DIR  # toy target and other built artefacts
    seed: int = 0
