"""GGUF targets (`target.gguf_file=`): a llama.cpp `.gguf` file, dequantized by transformers, written once into the
cache as a regular Hugging Face folder (bf16 safetensors, tokenizer, chat template, generation config) that every
stage, transformers and vLLM load like any other model folder.

The folder is keyed by the GGUF file's sha256, so the same file always gives the same folder, tokenizer fingerprint
and weights, and a changed file gives a new folder. The folder is the target: plain decoding, the feature cache and
the lossless checks all read its bf16 weights, never the GGUF directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from specdistill.distill.errors import UserError
from specdistill.distill.outputs import replace_folder

log = logging.getLogger(__name__)
CONVERTED_DIR = "gguf"  # under cache_dir
SAVED_DTYPE = torch.bfloat16
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → sha256: each stage resolves the target twice


def find_gguf_file(target_cfg: Any) -> Path:
    """The local `.gguf` file `target.gguf_file` names: a path, a file in the `target.name_or_path` folder, or a file
    in the `target.name_or_path` Hub repository (downloaded into the Hugging Face cache)."""
    name = str(target_cfg.gguf_file)
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct.resolve()
    folder = Path(str(target_cfg.name_or_path)).expanduser()
    if folder.is_dir():
        if (folder / name).is_file():
            return (folder / name).resolve()
        raise UserError(f"target.gguf_file={name}: no such file, neither as a path nor in the folder "
                        f"target.name_or_path={folder}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(target_cfg.name_or_path), name, revision=target_cfg.revision))
    except Exception as error:  # offline, no such repository or file: all fixed the same way
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(
            f"target.gguf_file={name}: not a local file, and it cannot be fetched from the Hub repository "
            f"target.name_or_path={target_cfg.name_or_path} ({reason}). Pass the path of a local .gguf file "
            "(for SmolLM2, `specdistill setup` fetches one into the cache)") from None


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def converted_folder(gguf_path: Path, cache_dir: str) -> Path:
    """The cached HF folder of `gguf_path`, converting it first if this is its first use (concurrent ranks wait on a
    lock; the folder appears whole, by rename)."""
    folder = Path(cache_dir).expanduser() / CONVERTED_DIR / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            log.info("converting %s to a Hugging Face folder (bf16 safetensors) in %s, once", gguf_path, folder)
            with replace_folder(folder) as staging:
                convert_gguf(gguf_path, staging)
    return folder


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` through transformers and save it as a plain HF folder in `out_dir`.

    transformers refuses to `save_pretrained` a model loaded from GGUF, so its state dict moves into a model built
    from the same config without the `quantization_config` the GGUF load leaves behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except ImportError as error:  # the gguf package
        raise UserError(f"target.gguf_file: reading GGUF needs the `gguf` package ({error}); pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"target.gguf_file={gguf_path}: transformers cannot load it ({first_line}); GGUF targets "
                        "must use an architecture transformers reads from GGUF (llama, mistral, qwen2, qwen3, ...)") \
            from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=SAVED_DTYPE)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _portable_config(out_dir / "config.json", gguf_path)


def _portable_config(config_path: Path, gguf_path: Path) -> None:
    """config.json as older loaders read it too: `rope_theta` at the top level (transformers ≥ 5 keeps it only under
    `rope_parameters`, which vLLM's pinned transformers does not read) and `torch_dtype` beside `dtype`."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    config.setdefault("torch_dtype", config.get("dtype", "bfloat16"))
    config["specdistill_converted_from"] = {"gguf_file": gguf_path.name, "sha256": file_sha256(gguf_path)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
