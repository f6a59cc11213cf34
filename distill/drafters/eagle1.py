"""EAGLE-1 (`drafter=eagle1`): fc([embed(t_{i+1}); f_i]) → decoder layers → f̂_{i+1}, read out by the target's frozen
LM head. Loss: w_feature · SmoothL1(f̂, f) + w_token · soft-CE against the target, input features noised by U(−a, a)
(distill/drafters/feature.py states the alignment). It reads the target's final normed hidden state.

    specdistill train drafter=eagle1 data_dir=...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specdistill.distill import objectives
from specdistill.distill.drafters.feature import (
    BuildContext,
    DraftLoss,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterOptions,
    LeanFeatureHead,
    draft_config_from_target,
    rows,
    sequence_positions,
)
from specdistill.distill.drafters.engine_layouts import (
    EngineLayout,
    ExportUnsupported,
    check_tensor_shapes,
    shapes_of,
    llama_layer_config,
    read_llama_layer_config,
)
from specdistill.distill.drafters.modules import DraftDecoderLayer, causal_bias
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.lean import Linear, lean_target
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.target import FINAL_NORMED, TargetOutput


class Eagle1Config(FeatureDrafterConfig):
    model_type = "specdistill_eagle1"


@dataclass
class Eagle1Options(FeatureDrafterOptions):
    kind: str = "eagle1"


class Eagle1Drafter(FeatureDrafter):
    config_class = Eagle1Config
    Options = Eagle1Options
    supports_stop_head = True

    def __init__(self, config: Eagle1Config):
        super().__init__(config)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layers = nn.ModuleList([self.make_layer(index) for index in range(config.num_hidden_layers)])
        self.post_init()

    @classmethod
    def config_overrides(cls, options: Eagle1Options) -> dict:
        """Options a subclass records in its config (saved in config.json)."""
        return {}

    def make_layer(self, index: int) -> DraftDecoderLayer:
        """The reference drops the first layer's input norm (its input is the fc output)."""
        return DraftDecoderLayer(self.config, input_norm=index > 0)

    @classmethod
    def build(cls, options: Eagle1Options, context: BuildContext) -> "Eagle1Drafter":
        target = context.target
        layers = list(options.feature_layers or cls.default_feature_layers(target.num_layers))
        config = draft_config_from_target(cls.config_class, target.config, layers, num_hidden_layers=options.num_layers,
                                          **cls.config_overrides(options), **cls.stop_head_field(options))
        drafter = cls(config)
        drafter.record_target(context)
        drafter.attach_target(target)
        return drafter

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predicted next features: input_ids[i] is t_{i+1}, features[i] is f_i."""
        bias = causal_bias(attention_mask, features.dtype)
        return self.training_step(input_ids, features, sequence_positions(input_ids), bias)[0]

    def hidden_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """The per-position input h_i the layers read: the tapped feature itself."""
        return features[self.feature_layers[0]]

    def draft_outputs(self, input_ids, hidden, position_ids, bias, caches=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward over (t_{i+1}, h_i) pairs → (the part the LM head reads, the predicted feature that
        is regressed and fed back); `bias` is an additive [batch, 1, rows, rows] attention bias; `caches` as in
        `unroll_step`."""
        embeds = self.target_embed(input_ids).to(hidden.dtype)
        hidden = self.mix_token(self.fc(torch.cat([embeds, hidden], dim=-1)), embeds)
        cos, sin = self._rotary(position_ids, hidden.dtype)
        for index, layer in enumerate(self.layers):
            earlier = caches[index] if caches is not None else None
            hidden, keys_values = layer(hidden, cos, sin, bias, earlier_steps=earlier or None)
            if caches is not None:
                caches[index].append(keys_values)
        return self.split_output(hidden)

    def unroll_step(self, input_ids, hidden, position_ids, bias, caches):
        return self.draft_outputs(input_ids, hidden, position_ids, bias, caches)

    def mix_token(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """What follows fc: nothing for EAGLE-1 (FSPAD's feature sampling goes here)."""
        return hidden

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM-head input, fed-back feature) of the last layer's output: the same tensor for EAGLE-1."""
        return output, output

    def training_step(self, input_ids, hidden, position_ids, bias, with_logits: bool = False):
        """→ (the fed-back features, logits over the target's vocabulary when `with_logits`)."""
        token_part, feature_part = self.draft_outputs(input_ids, hidden, position_ids, bias)
        return feature_part, (self.vocab_logits(token_part) if with_logits else None)

    def vocab_logits(self, token_part: torch.Tensor) -> torch.Tensor:
        """The target's frozen LM head reads the predicted feature (its LM-head half, for FSPAD)."""
        return self.target_lm_head(token_part)

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        objective: FeatureObjective,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        features = target.features[self.feature_layers[0]]
        noisy = objectives.uniform_noise(features, objective.noise, generator)
        bias = causal_bias(attention_mask, features.dtype)

        def step_loss(step, token_part, predicted, selected):
            # row i of step s predicts f_{i+1+s} and the target's distribution there (the LM head reads only these rows)
            target_features, target_logits = rows(features, 1 + step, selected), rows(target.logits, 1 + step, selected)
            draft_logits = self.target_lm_head(token_part)
            per_row = objective.feature_weight * objectives.feature_regression(predicted, target_features)
            per_row = per_row + objective.token_weight * objectives.soft_cross_entropy(draft_logits, target_logits)
            if objective.top_k_weight:
                per_row = per_row + objective.top_k_weight * objectives.top_k_cross_entropy(
                    draft_logits, target_logits, objective.top_k)
            return per_row, objectives.top1_agreement(draft_logits, target_logits)

        return self.unrolled_loss(input_ids, loss_mask, noisy, bias, objective, step_loss)

    def head(self) -> "Eagle1Head":
        return Eagle1Head(self)

    # ---- serving engines' layouts (distill/drafters/engine_layouts.py has the facts they rest on) ----

    export_formats = ("vllm", "sglang")
    speculative_methods = {"vllm": "eagle", "sglang": "EAGLE"}
    engine_architectures = ("EagleLlamaForCausalLM", "LlamaForCausalLMEagle")  # what import reads

    def engine_layout(self, format: str, gamma: int) -> EngineLayout:
        """EAGLE-1 as vLLM's EagleLlamaForCausalLM or SGLang's LlamaForCausalLMEagle reads it: a Llama config of the
        draft layers, `fc`, `layers.N.*` (layer 0 without input norm), the LM head left to the target's.

        vLLM's fc has no bias. Ours has one (the EAGLE reference's), and it folds exactly into attention biases:
        layer 0 reads h + b unnormed, so q/k/v = W(h + b) = Wh + Wb, and the residual's + b is o_proj's bias."""
        where = f"format={format}"
        if list(self.config.feature_layers) != [FINAL_NORMED]:
            raise ExportUnsupported(f"{where}: serving engines feed EAGLE-1 the target's final normed state; this "
                                    f"drafter reads feature_layers {list(self.config.feature_layers)}")
        tensors = self.engine_tensors()
        engine_config = llama_layer_config(self.config, self.dtype)
        if format == "sglang":
            return EngineLayout(format, {**engine_config, "architectures": ["LlamaForCausalLMEagle"]}, tensors)
        if format != "vllm":
            raise ExportUnsupported(f"{where}: an EAGLE-1 drafter exports to {', '.join(self.export_formats)} or hf")
        fc_bias = tensors.pop("fc.bias")
        if bool(fc_bias.any()):
            engine_config["attention_bias"] = True
            for index in range(self.config.num_hidden_layers):
                prefix = f"layers.{index}.self_attn"
                for projection in ("q_proj", "k_proj", "v_proj"):
                    weight = tensors[f"{prefix}.{projection}.weight"]
                    bias = weight.double() @ fc_bias.double() if index == 0 else torch.zeros(weight.shape[0])
                    tensors[f"{prefix}.{projection}.bias"] = bias.to(weight.dtype)
                tensors[f"{prefix}.o_proj.bias"] = fc_bias if index == 0 else torch.zeros_like(fc_bias)
        return EngineLayout(format, {**engine_config, "architectures": ["EagleLlamaForCausalLM"]}, tensors)

    @classmethod
    def from_engine_layout(cls, layout: EngineLayout, where: str) -> "Eagle1Drafter":
        """The inverse of `engine_layout`, attention biases unfolded back into fc's bias (refused when they are not
        a folded fc bias: specdistill's layers have no attention biases)."""
        config = Eagle1Config(**read_llama_layer_config(layout.config, where), feature_layers=[FINAL_NORMED],
                              **{key: value for key, value in layout.provenance.items() if value is not None})
        drafter = Eagle1Drafter(config)
        tensors = dict(layout.tensors)
        if layout.format == "vllm":
            tensors["fc.bias"] = unfold_fc_bias(tensors, config.num_hidden_layers, where)
        expected = shapes_of(drafter.state_dict())
        check_tensor_shapes(shapes_of(tensors), expected, where, "model.safetensors",
                            ignored=("embed_tokens.weight", "lm_head.weight"))
        drafter.load_state_dict({name: tensors[name] for name in expected})
        return drafter


class Eagle1Head(LeanFeatureHead):
    """EAGLE-1's decoding forward: fc([embed(t); h]) → layers → f̂ (fed back), logits = the target's LM head(f̂).
    The target's lean LM head is shared when the target decodes through distill/lean.py (one packed copy)."""

    def __init__(self, drafter: Eagle1Drafter):
        super().__init__(drafter)
        lean = lean_target(drafter.attached_target)
        lm_head = drafter.target_lm_head
        self.lm_head = lean.lm_head if lean is not None else Linear(lm_head.weight.detach(), lm_head.bias)

    def decode_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return features[self.feature_layers[0]]

    def __call__(self, input_ids, hidden, position_ids, cache: KVCache, mask, last_logits_only: bool = False):
        embeds, rotary = self.embed_and_rotary(input_ids, hidden, position_ids, cache)
        hidden = self.mix_token(self.fc(torch.cat([embeds, hidden], dim=-1)), embeds)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, cache.layer(index), mask)
        token_part, fed_back = self.split_output(hidden)
        return fed_back, self.lm_head(token_part[:, -1:] if last_logits_only else token_part)

    def mix_token(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return hidden

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output, output


def unfold_fc_bias(tensors: dict[str, torch.Tensor], num_layers: int, where: str) -> torch.Tensor:
    """fc's bias from a vLLM EAGLE-1 checkpoint (popping the attention biases `engine_layout` folded it into);
    zero when there are none."""
    names = [f"layers.{index}.self_attn.{projection}.bias" for index in range(num_layers)
             for projection in ("q_proj", "k_proj", "v_proj", "o_proj")]
    biases = {name: tensors.pop(name) for name in names if name in tensors}
    hidden = tensors["fc.weight"].shape[0]
    if not biases:
        return torch.zeros(hidden, dtype=tensors["fc.weight"].dtype)
    fc_bias = biases.get("layers.0.self_attn.o_proj.bias")
    folded = fc_bias is not None and len(biases) == len(names) and all(
        torch.allclose(biases[f"layers.0.self_attn.{projection}.bias"].double(),
                       tensors[f"layers.0.self_attn.{projection}.weight"].double() @ fc_bias.double(),
                       rtol=1e-3, atol=1e-5)
        for projection in ("q_proj", "k_proj", "v_proj")
    ) and all(not bool(bias.any()) for name, bias in biases.items() if not name.startswith("layers.0."))
    if not folded:
        raise ExportUnsupported(f"{where}: the draft layers have attention biases that are not a folded fc bias; "
                                "specdistill's EAGLE-1 layers have none, so it cannot import this drafter exactly")
    return fc_bias


register_kind("eagle1", Eagle1Drafter)
