"""Resolve and load the target a `TargetConfig` names: a Hub name or local folder, or the built-in toy target.

The toy is the target only while `target.name_or_path` is the toy's own name (`target.toy.name`): a user who sets
`target.name_or_path` on top of the default `target=toy` gets their model, with none of the toy's values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from specdistill.distill.errors import UserError
from specdistill.distill.toy import ensure_toy_target

log = logging.getLogger(__name__)
_announced_targets: set[str] = set()  # each stage loads the tokenizer and the model: say which target once


def uses_toy(target_cfg: Any) -> bool:
    """Whether the target is the built-in toy: `target.toy` is set and `target.name_or_path` names that toy."""
    return target_cfg.toy is not None and target_cfg.name_or_path == target_cfg.toy.name


def _announce(line: str) -> None:
    if line not in _announced_targets:
        _announced_targets.add(line)
        log.info(line)


def resolve_target_path(target_cfg: Any, cache_dir: str) -> str:
    """The folder or Hub name to load the target from; builds the toy target (once, cached) when it is the target,
    and converts a GGUF target into a cached folder (once) when `target.gguf_file` is set."""
    if target_cfg.gguf_file and not (target_cfg.prefer_hub and _hub_reachable(target_cfg)):
        from specdistill.distill.gguf import converted_folder, find_gguf_file

        gguf_path = find_gguf_file(target_cfg)
        folder = str(converted_folder(gguf_path, cache_dir))
        fallback = " (the Hub is not reachable: target.prefer_hub falls back to it)" if target_cfg.prefer_hub else ""
        _announce(f"target: {target_cfg.name_or_path} from the GGUF file {gguf_path}{fallback}, converted once "
                  f"into {folder}")
        return folder
    if not uses_toy(target_cfg):
        unused_toy = " (the toy preset's settings do not apply to it)" if target_cfg.toy is not None else ""
        revision = f" at revision {target_cfg.revision}" if target_cfg.revision else ""
        _announce(f"target: {target_cfg.name_or_path}{revision}, from target.name_or_path{unused_toy}")
        return target_cfg.name_or_path
    toy_cfg = target_cfg.toy
    if isinstance(toy_cfg, DictConfig):
        toy_cfg = OmegaConf.to_object(toy_cfg)
    path = str(ensure_toy_target(toy_cfg, Path(cache_dir).expanduser()))
    _announce(f"target: the built-in toy target '{target_cfg.name_or_path}', built in {path}")
    return path


@functools.cache
def _hub_reachable_cached(name: str, revision: str | None) -> bool:
    from huggingface_hub import HfApi

    try:  # one request with a timeout: hf_hub_download would retry with backoff for half a minute when offline
        HfApi().model_info(name, revision=revision, timeout=5)
    except Exception:  # offline, unknown repository, gated: the GGUF file is used instead (announced)
        return False
    return True


def _hub_reachable(target_cfg: Any) -> bool:
    """Whether the Hub name target.name_or_path can be reached now (asked once per process)."""
    if Path(str(target_cfg.name_or_path)).expanduser().exists():
        return False
    return _hub_reachable_cached(str(target_cfg.name_or_path), target_cfg.revision)


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


def _dtype_name(dtype: Any) -> str:
    return dtype.name if hasattr(dtype, "name") else str(dtype)


def target_dtype(target_cfg: Any, device: torch.device) -> torch.dtype:
    """The dtype the target loads in on `device`: `target.dtype`, where `auto` is the toy's own dtype for the toy."""
    dtype_name = _dtype_name(target_cfg.dtype)
    if dtype_name == "auto" and uses_toy(target_cfg):
        dtype_name = _dtype_name(target_cfg.toy.dtype)
    return resolve_dtype(dtype_name, device)


def load_target_model(target_cfg: Any, cache_dir: str, device: torch.device | str = "cpu") -> Any:
    """The target as a causal LM in eval mode with gradients off, on `device`, in the configured dtype."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = resolve_target_path(target_cfg, cache_dir)
    kwargs: dict[str, Any] = {
        "revision": target_cfg.revision,
        "dtype": target_dtype(target_cfg, device),
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


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """The tokenizer's EOS plus the generation config's (chat models end a turn with their own token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids
