"""EAGLE-3 (`drafter=eagle3`): g_i = fc([h_low; h_mid; h_high]) of three tapped target layers; the first layer's
attention reads [norm(embed(t_{i+1})) ‖ norm(g_i)]; a final norm and its own LM head over a reduced draft vocabulary
(vLLM's d2t/t2d layout). Training-time test: at unrolled step s the token input shifts left by s, the drafter's own
output of step s−1 replaces g, RoPE positions are i + s, targets shift by s, and the loss of step s (soft-CE against
the target restricted to the draft vocabulary, where the target's argmax lies inside it) is weighted decay**s.

    specdistill train drafter=eagle3 data_dir=...            # taps: drafter.feature_layers, else the default for the
                                                             # target's depth (`default_eagle3_layers`)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

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
    ascending_taps,
    check_tensor_shapes,
    shapes_of,
    checked_draft_ids,
    llama_layer_config,
    read_llama_layer_config,
)
from specdistill.distill.drafters.modules import DraftDecoderLayer, RMSNorm, causal_bias
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.lean import Linear, rms_norm
from specdistill.distill.errors import UserError
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.target import FINAL_NORMED, TargetOutput, check_feature_layers

log = logging.getLogger(__name__)


class Eagle3Config(FeatureDrafterConfig):
    model_type = "specdistill_eagle3"
    norm_before_residual: bool = False  # written out: vLLM defaults it to true when absent, the EAGLE reference is false
    norm_before_fc: bool = False  # one RMSNorm over the concatenated taps before fc (speculators / SGLang `input_norm`)
    fc_norm: bool = False  # an RMSNorm per tapped layer before fc (EAGLE 3.1; speculators' `fc_norm`)


@dataclass
class Eagle3Options(FeatureDrafterOptions):
    kind: str = "eagle3"
    draft_vocab_size: Optional[int] = 32000  # the most frequent masked tokens of the training data; None: all
    norm_before_residual: bool = False  # EAGLE 3.1: the first layer's residual is the normed fused feature
    # normalise the taps before fc, under the names serving engines read: one RMSNorm over their concatenation
    # (norm_before_fc, gpt-oss style) and/or one per tapped layer (fc_norm, EAGLE 3.1); when both, the concatenation
    # first, as vLLM's Eagle3LlamaForCausalLM.combine_hidden_states does
    norm_before_fc: bool = False
    fc_norm: bool = False


def default_eagle3_layers(num_layers: int) -> list[int]:
    """EAGLE-3's taps (low, middle, high) for an L-layer target: the reference's inputs of layers 2, L/2 and L−3, which
    are three distinct layers from L = 7 on (the target presets' [2, 16, 29] at L = 32). Below that they repeat a layer
    (L = 6: [2, 3, 3]) or run backwards, so the taps spread over the depth instead: the lowest layer input past the
    embeddings, the middle one and the last one, [1, L/2, L−1] (the toy target's [1, 3, 5]; [0, 1, 2] at L = 3). At
    L = 2 the two layer inputs and the final normed state are the three distinct states there are ([0, 1, −1], the
    tiny toy's: it trains, but export refuses the −1 tap). Fewer layers are refused, naming the key that sets the taps
    by hand."""
    if num_layers == 2:
        return [0, 1, FINAL_NORMED]
    if num_layers < 2:
        raise UserError(f"EAGLE-3 taps 3 distinct states and the target has {num_layers} layer(s): set "
                        f"drafter.feature_layers to the ids to tap (0..{num_layers - 1}: a layer's input; -1: the "
                        "final normed state, which trains but cannot be exported), or pick another drafter")
    reference = [2, num_layers // 2, num_layers - 3]
    if reference == sorted(set(reference)):
        return reference
    return [min(1, num_layers - 3), num_layers // 2, num_layers - 1]


def check_taps(layers: list[int], num_layers: int, key: str) -> None:
    """Refuse a layer tapped twice (fc would read one state in two column blocks, and export refuses it) or one the
    target lacks, naming the key the taps came from."""
    repeated = next((layer for index, layer in enumerate(layers) if layer in layers[:index]), None)
    if repeated is not None:
        raise UserError(f"{key}={layers} taps layer {repeated} twice; EAGLE-3 reads each tapped layer once (export "
                        f"refuses a repeat): give distinct ids in 0..{num_layers - 1} (-1: the final normed state)")
    check_feature_layers(layers, num_layers, key)


def select_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int, vocab_size: int) -> torch.Tensor:
    """The `draft_vocab_size` most frequent target ids under the loss mask (ties: lower id first), sorted."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    usable = min(len(token_counts), vocab_size)
    counts[:usable] = token_counts[:usable]
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: ties keep the lower id first
    return order[:draft_vocab_size].sort().values


def log_draft_vocab_coverage(token_counts: torch.Tensor, draft_ids: torch.Tensor) -> None:
    """How much of the training data's masked tokens the draft vocabulary covers: the drafter cannot propose the
    rest, so 1 − coverage bounds how often its first draft can be accepted."""
    total = int(token_counts.sum())
    if total == 0:
        return
    covered = int(token_counts[draft_ids[draft_ids < len(token_counts)]].sum())
    distinct = int((token_counts > 0).sum())
    log.info("draft vocabulary: %d ids cover %.2f%% of the %d masked training tokens (%d distinct ids occur)",
             len(draft_ids), 100 * covered / total, total, distinct)


@dataclass
class TargetSide:
    """The target's side of EAGLE-3's token loss ([batch, T] or [batch, T, draft vocabulary])."""

    argmax: torch.Tensor
    argmax_in_vocab: torch.Tensor
    restricted: torch.Tensor  # logits over the draft vocabulary
    probs: torch.Tensor  # their softmax, float32


class Eagle3Drafter(FeatureDrafter):
    config_class = Eagle3Config
    Options = Eagle3Options
    supports_stop_head = True

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        taps_width = len(config.feature_layers) * config.target_hidden_size
        self.fc_norm = nn.ModuleList([RMSNorm(config.target_hidden_size, config.rms_norm_eps)
                                      for _ in config.feature_layers]) if config.fc_norm else None
        self.input_norm = RMSNorm(taps_width, config.rms_norm_eps) if config.norm_before_fc else None
        self.fc = nn.Linear(taps_width, config.hidden_size, bias=False)
        self.layers = nn.ModuleList(
            [DraftDecoderLayer(config, reads_embeddings=index == 0) for index in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # target_id = draft_id + d2t[draft_id]; t2d marks target ids inside the draft vocabulary (vLLM's layout)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.post_init()

    @classmethod
    def default_feature_layers(cls, num_layers: int) -> tuple[int, ...]:
        return tuple(default_eagle3_layers(num_layers))

    @classmethod
    def build(cls, options: Eagle3Options, context: BuildContext) -> "Eagle3Drafter":
        """Taps: `options.feature_layers`, else `default_eagle3_layers` of the target's depth; checked here, at train
        start, so a repeated or missing layer never trains a drafter export refuses. The draft vocabulary is the most
        frequent masked tokens of `context.token_counts`, the LM head starting from the target's rows for them."""
        target = context.target
        vocab_size = target.config.vocab_size
        layers = list(options.feature_layers or cls.default_feature_layers(target.num_layers))
        check_taps(layers, target.num_layers, "drafter.feature_layers")
        draft_vocab_size = min(options.draft_vocab_size or vocab_size, vocab_size)
        config = draft_config_from_target(cls.config_class, target.config, layers, num_hidden_layers=options.num_layers,
                                          draft_vocab_size=draft_vocab_size,
                                          norm_before_residual=options.norm_before_residual,
                                          norm_before_fc=options.norm_before_fc, fc_norm=options.fc_norm,
                                          **cls.stop_head_field(options), **cls.config_fields(options, context))
        drafter = cls(config)
        counts = context.token_counts if context.token_counts is not None else torch.zeros(vocab_size, dtype=torch.long)
        draft_ids = select_draft_vocab(counts, draft_vocab_size, vocab_size)
        log_draft_vocab_coverage(counts, draft_ids)
        drafter.set_draft_vocab(draft_ids, target.lm_head)
        drafter.record_target(context)
        drafter.attach_target(target)
        return drafter

    @classmethod
    def config_fields(cls, options: Eagle3Options, context: BuildContext) -> dict:
        """Config fields a kind built on EAGLE-3 adds to its config (none here)."""
        return {}

    def set_draft_vocab(self, draft_ids: torch.Tensor, target_lm_head: nn.Linear | None = None) -> None:
        """Use the (sorted) target ids `draft_ids` as the draft vocabulary; optionally start the LM head from the
        target's rows for those ids."""
        draft_ids = draft_ids.sort().values.to(self.d2t.device)
        self.d2t.copy_(draft_ids - torch.arange(len(draft_ids), device=draft_ids.device))
        self.t2d.zero_()
        self.t2d[draft_ids] = True
        if target_lm_head is not None:
            with torch.no_grad():
                self.lm_head.weight.copy_(target_lm_head.weight[draft_ids.to(target_lm_head.weight.device)])

    @property
    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def fuse(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """g = fc(taps), the taps normalised first where the config says so."""
        return self.combine(torch.cat([features[layer_id] for layer_id in self.config.feature_layers], dim=-1))

    def combine(self, taps: torch.Tensor) -> torch.Tensor:
        """`fuse` of the taps already concatenated in `feature_layers` order (vLLM's combine_hidden_states)."""
        if self.input_norm is not None:
            taps = self.input_norm(taps)
        if self.fc_norm is not None:
            taps = torch.cat([norm(tap) for norm, tap in zip(self.fc_norm, taps.chunk(len(self.fc_norm), dim=-1))], -1)
        return self.fc(taps)

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        bias: torch.Tensor | None,
        caches: list[list] | None = None,
    ) -> torch.Tensor:
        """One training-time-test step → the pre-norm output feature (`logits` reads it out). `caches` (one list
        per layer) holds the keys/values of earlier steps and receives this step's."""
        embeds = self.target_embed(input_ids).to(hidden.dtype)
        cos, sin = self._rotary(position_ids, hidden.dtype)
        for index, layer in enumerate(self.layers):
            earlier = caches[index] if caches is not None else None
            hidden, keys_values = layer(hidden, cos, sin, bias, embeds=embeds, earlier_steps=earlier or None)
            if caches is not None:
                caches[index].append(keys_values)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of output features."""
        return self.lm_head(self.norm(hidden))

    def hidden_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """The per-position input h_i the layers read: the fused tapped features."""
        return self.fuse(features)

    def training_step(self, input_ids, hidden, position_ids, bias, with_logits: bool = False):
        """One training-time-test step → (output features, logits over the target's vocabulary, −inf outside the
        draft vocabulary, when `with_logits`)."""
        hidden = self.step(input_ids, hidden, position_ids, bias)
        return hidden, (self.vocab_logits(hidden) if with_logits else None)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Its own LM head over the draft vocabulary, mapped into the target's (−inf outside the draft vocabulary)."""
        draft_logits = self.logits(hidden)
        logits = draft_logits.new_full((*draft_logits.shape[:-1], self.config.vocab_size), float("-inf"))
        logits[..., self.draft_to_target] = draft_logits
        return logits

    def forward(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor], attention_mask: torch.Tensor):
        """Step-0 draft-vocabulary logits: input_ids[i] is t_{i+1}, features hold the tapped layers at i."""
        hidden = self.fuse(features)
        position_ids = sequence_positions(input_ids)
        return self.logits(self.step(input_ids, hidden, position_ids, causal_bias(attention_mask, hidden.dtype)))

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        objective: FeatureObjective,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        hidden = self.fuse(self.noisy_taps(target, objective, generator))
        bias = causal_bias(attention_mask, hidden.dtype)
        side = self.target_side(target)

        def step_loss(step, token_part, fed_back, selected):
            # row i of step s predicts token i + 2 + s from the target's logits at i + 1 + s
            return self.token_loss(self.logits(token_part), side, lambda x: rows(x, 1 + step, selected), objective)

        return self.unrolled_loss(input_ids, loss_mask, hidden, bias, objective, step_loss)

    def target_side(self, target: TargetOutput) -> "TargetSide":
        """The target's side of the loss, once for every step: its argmax, whether that lies in the draft vocabulary
        (positions whose best token the drafter cannot propose are not trained on), its logits over that vocabulary
        and their softmax."""
        draft_to_target = self.draft_to_target
        if getattr(target, "argmax", None) is not None:  # the feature cache: the LM head's draft-vocabulary rows only
            target_argmax, restricted = target.argmax, target.logits_over(draft_to_target)
            argmax_in_vocab = self.t2d[target_argmax]
        else:
            target_argmax = target.logits.argmax(dim=-1)
            restricted, argmax_in_vocab = objectives.restrict_to_draft_vocab(target.logits, draft_to_target,
                                                                             target_argmax)
        return TargetSide(target_argmax, argmax_in_vocab, restricted, restricted.float().softmax(dim=-1))

    def token_loss(self, draft_logits: torch.Tensor, side: "TargetSide", pick: Callable[[torch.Tensor], torch.Tensor],
                   objective: FeatureObjective) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row soft cross-entropy over the draft vocabulary (+ top-K, HASS) of `draft_logits` against the target's
        rows `pick` selects from its [batch, T, …] tensors → (loss per row, zero where the target's argmax lies outside
        the draft vocabulary; agreement of the drafter's argmax with the target's, in the target's vocabulary, over
        every row: an honest acceptance proxy)."""
        in_vocab = pick(side.argmax_in_vocab).to(draft_logits.dtype)
        per_row = objective.token_weight * objectives.cross_entropy_with_probs(draft_logits, pick(side.probs))
        if objective.top_k_weight:
            per_row = per_row + objective.top_k_weight * objectives.top_k_cross_entropy(
                draft_logits, pick(side.restricted), objective.top_k)
        draft_tokens = self.draft_to_target[draft_logits.argmax(dim=-1)]
        return per_row * in_vocab, draft_tokens == pick(side.argmax)

    @classmethod
    def check_objective(cls, objective: FeatureObjective) -> None:
        if objective.feature_weight != 0:
            raise UserError(f"objective.feature_weight={objective.feature_weight}: EAGLE-3's output is not in the "
                            "target's feature space, so it has no feature loss; set it to 0 (objective=eagle3, or "
                            "objective=hass_eagle3 for HASS)")

    def unroll_step(self, input_ids, hidden, position_ids, bias, caches):
        hidden = self.step(input_ids, hidden, position_ids, bias, caches)
        return hidden, hidden

    def head(self) -> "Eagle3Head":
        return Eagle3Head(self)

    # ---- serving engines' layouts (distill/drafters/engine_layouts.py has the facts they rest on) ----

    export_formats = ("vllm", "speculators", "sglang")
    speculative_methods = {"vllm": "eagle3", "sglang": "EAGLE3"}
    engine_architectures = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator")  # import reads

    def check_target(self, target, where: str) -> None:
        """Also: every draft id maps into the target's vocabulary (a d2t of ids instead of offsets fails here)."""
        super().check_target(target, where)
        checked_draft_ids(self.draft_to_target.cpu(), target.config.vocab_size, where)

    def engine_layout(self, format: str, gamma: int) -> EngineLayout:
        """This drafter as `format`'s engine reads it. The taps are written in ascending order (fc's columns, and
        the norms before fc, permuted to match), as engines concatenate them; SGLang reads layer-output ids. `gamma`
        (export's, the drafted tokens per step) goes into the speculators config."""
        config, where = self.config, f"format={format}"
        tensors = self.engine_tensors()
        taps, order, columns = ascending_taps(list(config.feature_layers), config.target_hidden_size, where)
        tensors["fc.weight"] = tensors["fc.weight"][:, columns].contiguous()
        if config.norm_before_fc:
            tensors["input_norm.weight"] = tensors["input_norm.weight"][columns].contiguous()
        if config.fc_norm:
            norms = [tensors.pop(f"fc_norm.{index}.weight") for index in range(len(order))]
            tensors.update({f"fc_norm.{new}.weight": norms[old] for new, old in enumerate(order)})
        if config.draft_vocab_size == config.vocab_size:
            # the whole vocabulary: vLLM then has no draft_id_to_target_id parameter and refuses a d2t tensor
            del tensors["d2t"], tensors["t2d"]
        layer_config = llama_layer_config(config, self.dtype)
        eagle_fields = {"draft_vocab_size": config.draft_vocab_size, "target_hidden_size": config.target_hidden_size,
                        "norm_before_residual": config.norm_before_residual, "norm_before_fc": config.norm_before_fc,
                        "fc_norm": config.fc_norm, "norm_output": False}
        if format == "vllm":
            engine_config = {**layer_config, "architectures": ["LlamaForCausalLMEagle3"], **eagle_fields,
                             "eagle_config": {"eagle_aux_hidden_state_layer_ids": taps, "use_aux_hidden_state": True}}
        elif format == "speculators":
            engine_config = {
                "architectures": ["Eagle3Speculator"],
                "speculators_model_type": "eagle3",
                "speculators_config": {
                    "algorithm": "eagle3",
                    "default_proposal_method": "greedy",
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma,
                                          "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                    "verifier": {"name_or_path": config.target_name_or_path,
                                 **({"revision": config.target_revision} if config.target_revision else {})},
                },
                "transformer_layer_config": {**layer_config, "architectures": ["LlamaForCausalLM"]},
                **eagle_fields,
                "eagle_aux_hidden_state_layer_ids": taps,
                "torch_dtype": layer_config["torch_dtype"],
            }
        elif format == "sglang":
            engine_config = self._sglang_config(layer_config, taps, where)
            tensors = {name.replace("layers.0.", "midlayer.", 1): tensor for name, tensor in tensors.items()}
        else:
            raise ExportUnsupported(f"{where}: an EAGLE-3 drafter exports to {', '.join(self.export_formats)} or hf")
        return EngineLayout(format, engine_config, tensors)

    def _sglang_config(self, layer_config: dict, taps: list[int], where: str) -> dict:
        """SGLang's LlamaForCausalLMEagle3 drops config keys it does not know without a word, so any option it does
        not read is refused here rather than written and lost."""
        config = self.config
        unread = [name for name in ("norm_before_residual", "norm_before_fc", "fc_norm") if getattr(config, name)]
        if unread:
            raise ExportUnsupported(f"{where}: SGLang's LlamaForCausalLMEagle3 does not read {', '.join(unread)}, so "
                                    "it would serve another model than the one trained; export with format=vllm or "
                                    "format=speculators")
        if config.num_hidden_layers != 1:
            raise ExportUnsupported(f"{where}: SGLang's LlamaForCausalLMEagle3 has one draft layer (`midlayer`); this "
                                    f"drafter has {config.num_hidden_layers} (drafter.num_layers); export with "
                                    "format=vllm")
        # SGLang names a tap by the layer whose *output* it is (= the input of the next layer, our id − 1), and reads
        # a list that starts at 2 as layer inputs (sglang PR #25454): such a list would be read one layer off
        outputs = [layer_id - 1 for layer_id in taps]
        if outputs[0] < 0 or outputs[0] == 2:
            raise ExportUnsupported(f"{where}: taps {taps} (layer inputs) are layer outputs {outputs} in SGLang's "
                                    "convention, which SGLang cannot read unambiguously; export with format=vllm")
        extra = {"target_hidden_size": config.target_hidden_size} if config.target_hidden_size != config.hidden_size else {}
        return {**layer_config, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": config.draft_vocab_size,
                **extra, "eagle_config": {"eagle_aux_hidden_state_layer_ids": outputs, "use_aux_hidden_state": True}}

    @classmethod
    def from_engine_layout(cls, layout: EngineLayout, where: str) -> "Eagle3Drafter":
        """The inverse of `engine_layout`: an engine checkpoint (ours or a published one) → our drafter, after
        checking every tensor against its config (shapes, d2t inside the vocabulary)."""
        engine_config, tensors = layout.config, dict(layout.tensors)
        if layout.format == "speculators":
            if engine_config.get("speculators_model_type") != "eagle3":
                raise ExportUnsupported(f"{where}: speculators_model_type is "
                                        f"{engine_config.get('speculators_model_type')!r}, not 'eagle3'")
            layer_config, taps = engine_config.get("transformer_layer_config") or {}, \
                engine_config.get("eagle_aux_hidden_state_layer_ids")
            # vLLM reads a speculators config without norm_before_residual as true
            fields = {**engine_config, "norm_before_residual": engine_config.get("norm_before_residual", True)}
            verifier = (engine_config.get("speculators_config") or {}).get("verifier") or {}
            known = {"target_name_or_path": verifier.get("name_or_path"), "target_revision": verifier.get("revision")}
        else:
            layer_config = fields = engine_config
            # vLLM reads a top-level list first (gpu_model_runner._get_eagle3_aux_layers_from_config), then eagle_config's
            taps = engine_config.get("eagle_aux_hidden_state_layer_ids") or \
                (engine_config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
            if layout.format == "sglang":
                taps = None if taps is None else [layer_id + 1 for layer_id in taps]
            known = {}
        # the reference checkpoints name their one layer `midlayer`; vLLM maps it to layers.0 (hf_to_vllm_mapper)
        tensors = {name.replace("midlayer.", "layers.0.", 1): tensor for name, tensor in tensors.items()}
        known.update({key: value for key, value in layout.provenance.items() if value is not None})
        values = read_llama_layer_config(layer_config, where)
        if not taps:
            raise ExportUnsupported(f"{where}: config.json does not name the tapped layers "
                                    "(eagle_aux_hidden_state_layer_ids); engines would guess them, we do not")
        config = Eagle3Config(
            **values, feature_layers=list(taps), draft_vocab_size=fields.get("draft_vocab_size") or values["vocab_size"],
            target_hidden_size=fields.get("target_hidden_size") or values["hidden_size"],
            norm_before_residual=bool(fields.get("norm_before_residual", False)),
            norm_before_fc=bool(fields.get("norm_before_fc", False)), fc_norm=bool(fields.get("fc_norm", False)),
            **known)
        if fields.get("norm_output"):
            raise ExportUnsupported(f"{where}: norm_output=true (the normed output fed back) is not a variant "
                                    "specdistill trains")
        drafter = cls(config)
        expected = shapes_of(drafter.state_dict())
        check_tensor_shapes(shapes_of(tensors), {name: shape for name, shape in expected.items()
                                                 if name not in ("d2t", "t2d")},
                            where, "model.safetensors", ignored=("d2t", "t2d", "embed_tokens.weight"))
        d2t = tensors.get("d2t")
        if d2t is None and config.draft_vocab_size != config.vocab_size:
            raise UserError(f"{where}: the draft vocabulary ({config.draft_vocab_size}) is smaller than the "
                            f"vocabulary ({config.vocab_size}) but model.safetensors has no d2t mapping")
        draft_ids = torch.arange(config.draft_vocab_size) + (d2t.long() if d2t is not None else 0)
        order = checked_draft_ids(draft_ids, config.vocab_size, where)
        tensors["lm_head.weight"] = tensors["lm_head.weight"][order]  # our draft ids are ascending target ids
        drafter.load_state_dict({name: tensors[name] for name in expected if name not in ("d2t", "t2d")}, strict=False)
        drafter.set_draft_vocab(draft_ids[order])
        return drafter



class Eagle3Head(LeanFeatureHead):
    """EAGLE-3's decoding forward: h is the fused feature fc(layers ‖ …); the first layer's attention reads
    rms(embed(t)) ‖ rms(h); logits come from its own LM head over the draft vocabulary, mapped into the target's
    (−inf outside it)."""

    def __init__(self, drafter: Eagle3Drafter):
        super().__init__(drafter)
        with torch.no_grad():
            first = drafter.layers[0]
            self.first_norms = (first.input_layernorm.weight.detach(), first.hidden_norm.weight.detach())
            self.norm_before_residual = first.norm_before_residual
            self.norm = drafter.norm.weight.detach()
            self.fc_norms = None if drafter.fc_norm is None else [norm.weight.detach() for norm in drafter.fc_norm]
            self.input_norm = None if drafter.input_norm is None else drafter.input_norm.weight.detach()
            self.lm_head = Linear(drafter.lm_head.weight)
            draft_to_target = drafter.draft_to_target
            identity = len(draft_to_target) == self.vocab_size  # the draft vocabulary is the whole vocabulary
            self.draft_to_target = None if identity else draft_to_target

    def decode_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.combine(torch.cat([features[layer_id] for layer_id in self.feature_layers], dim=-1))

    def combine(self, taps: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            taps = rms_norm(taps, self.input_norm, self.eps)
        if self.fc_norms is not None:
            chunks = taps.chunk(len(self.fc_norms), dim=-1)
            taps = torch.cat([rms_norm(tap, weight, self.eps) for weight, tap in zip(self.fc_norms, chunks)], dim=-1)
        return self.fc(taps)

    def __call__(self, input_ids, hidden, position_ids, cache: KVCache, mask, last_logits_only: bool = False):
        hidden = self.hidden_states(input_ids, hidden, position_ids, cache, mask)
        return hidden, self.read_out(hidden[:, -1:] if last_logits_only else hidden)

    def hidden_states(self, input_ids, hidden, position_ids, cache: KVCache, mask) -> torch.Tensor:
        """The draft layers' output rows (fed back as the next position's feature)."""
        embeds, rotary = self.embed_and_rotary(input_ids, hidden, position_ids, cache)
        input_norm, hidden_norm = self.first_norms
        normed = rms_norm(hidden, hidden_norm, self.eps)
        attention_input = torch.cat([rms_norm(embeds, input_norm, self.eps), normed], -1)
        if self.norm_before_residual:  # the first layer's residual is the normed feature
            hidden = normed
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, cache.layer(index), mask, attention_input if index == 0 else None)
        return hidden

    def read_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary of output rows (−inf outside the draft vocabulary)."""
        draft_logits = self.lm_head(rms_norm(hidden, self.norm, self.eps))
        if self.draft_to_target is None:
            return draft_logits
        logits = draft_logits.new_full((*draft_logits.shape[:-1], self.vocab_size), float("-inf"))
        logits[..., self.draft_to_target] = draft_logits
        return logits


register_kind("eagle3", Eagle3Drafter)
