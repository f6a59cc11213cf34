"""The frozen target: a causal LM in eval mode with gradients off, run under `torch.inference_mode()`, that also
returns the hidden states a drafter reads ("features") at the layer ids the drafter asks for.

Layer ids follow the EAGLE-3 / vLLM convention: id `i` (0 ≤ i < num_layers) is the hidden state *entering* decoder
layer `i` (so 0 is the token embeddings); `FINAL_NORMED` (-1) is the last hidden state after the final norm, the
LM head's input, which EAGLE-1 regresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from specdistill.distill.errors import UserError
from specdistill.distill.kv_cache import cache_argument, returned_cache

FINAL_NORMED = -1


@dataclass
class TargetOutput:
    logits: torch.Tensor | None  # [batch, seq, vocab]
    features: dict[int, torch.Tensor]  # layer id → [batch, seq, hidden]
    past_key_values: Any


def check_feature_layers(layer_ids: Sequence[int], num_layers: int, where: str = "drafter.feature_layers") -> None:
    """Every id names a layer input (0..num_layers-1) or the final normed state (-1)."""
    for layer_id in layer_ids:
        if not (layer_id == FINAL_NORMED or 0 <= layer_id < num_layers):
            raise UserError(
                f"{where}: layer id {layer_id} is out of range for a target with {num_layers} layers "
                f"(valid: 0..{num_layers - 1} for the input of a layer, {FINAL_NORMED} for the final normed state)"
            )


class FrozenTarget(nn.Module):
    """Wraps a Hugging Face causal LM (Llama-like: `model.model.layers`, `model.lm_head`).

    The layers to tap are passed with each call, not stored on the target, so one target serves several drafters
    (each reading its own layers) in any order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_layers = model.config.num_hidden_layers

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        feature_layers: Sequence[int] = (),
        compute_logits: bool = True,
        for_training: bool = False,
    ) -> TargetOutput:
        """Logits and the features at `feature_layers` of `input_ids`. `for_training` returns ordinary tensors
        (copies of the inference tensors) so a drafter's autograd graph may use them."""
        check_feature_layers(feature_layers, self.num_layers)
        captured: dict[int, torch.Tensor] = {}

        def capture(layer_id: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[layer_id] = args[0] if args else kwargs["hidden_states"]

            return hook

        decoder = self.model.get_decoder()
        hooks = [decoder.layers[layer_id].register_forward_pre_hook(capture(layer_id), with_kwargs=True)
                 for layer_id in feature_layers if layer_id != FINAL_NORMED]
        try:
            with torch.inference_mode():
                hidden = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    **cache_argument(decoder, past_key_values),  # `cache`, or `past_key_values` before the rename
                    use_cache=past_key_values is not None,
                )
                last = hidden.last_hidden_state
                features = {layer_id: last if layer_id == FINAL_NORMED else captured[layer_id]
                            for layer_id in feature_layers}
                logits = self.lm_head(last) if compute_logits else None
        finally:
            for handle in hooks:
                handle.remove()
        if for_training:
            features = {layer_id: feature.clone() for layer_id, feature in features.items()}
            logits = logits.clone() if logits is not None else None
        return TargetOutput(logits=logits, features=features, past_key_values=returned_cache(hidden))
