"""Resolve and load the target named by a `TargetConfig`: the built-in toy target or a Hub name / local folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from specdistill.distill.errors import UserError
from specdistill.data_prep.toy import ToyTargetConfig, ensure_toy_target


def resolve_target_path(target_cfg: Any, cache_dir: str) -> str:
    """The folder or Hub name to load the target from; builds the toy target (once, cached) when `toy` is set."""
    if target_cfg.toy is None:
        return target_cfg.name_or_path
    toy_cfg = target_cfg.toy
    if isinstance(toy_cfg, DictConfig):
        toy_cfg = OmegaConf.to_object(toy_cfg)
    if not isinstance(toy_cfg, ToyTargetConfig):
        toy_cfg = ToyTargetConfig(**dict(toy_cfg))
    return str(ensure_toy_target(toy_cfg, Path(cache_dir).expanduser()))


def _load_error(what: str, path: str, error: Exception) -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"target.name_or_path: cannot load the {what} of '{path}': {first_line}\n"
        "  Point target.name_or_path at a local model folder, or at a Hub name this machine can reach "
        "(check HF_HUB_OFFLINE and your token); target.revision picks a branch or commit."
    )


def load_target_tokenizer(target_cfg: Any, cache_dir: str) -> Any:
    """The target's tokenizer, with `target.chat_template` replacing its own template when set."""
    from transformers import AutoTokenizer

    path = resolve_target_path(target_cfg, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=target_cfg.revision, trust_remote_code=target_cfg.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer", path, error) from None
    if target_cfg.chat_template:
        tokenizer.chat_template = target_cfg.chat_template
    return tokenizer


def resolve_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on an accelerator and float32 on CPU, where bf16 matmuls are slow."""
    if dtype_name == "auto":
        return torch.bfloat16 if device.type != "cpu" else torch.float32
    return getattr(torch, dtype_name)


def load_target_model(target_cfg: Any, cache_dir: str, device: torch.device | str = "cpu") -> Any:
    """The target as a causal LM in eval mode with gradients off, on `device`, in the configured dtype."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = resolve_target_path(target_cfg, cache_dir)
    dtype_name = target_cfg.dtype.name if hasattr(target_cfg.dtype, "name") else str(target_cfg.dtype)
    kwargs: dict[str, Any] = {
        "revision": target_cfg.revision,
        "dtype": resolve_dtype(dtype_name, device),
        "trust_remote_code": target_cfg.trust_remote_code,
    }
    if target_cfg.attn_implementation:
        kwargs["attn_implementation"] = target_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error("model", path, error) from None
    model.to(device).eval().requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary: `train` checks that a dataset was prepared for its target's tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
