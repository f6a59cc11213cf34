"""EAGLE-1 and EAGLE-3 drafters: heads that read the frozen target's features and predict its next features/tokens.

Alignment (EAGLE): tokens t_0..t_{T−1}, target features f_i (position i's hidden state, which predicts t_{i+1}) and
target logits L_i. The drafter at position i reads (t_{i+1}, f_i), outputs the feature of position i+1 and predicts
t_{i+2}; its targets are f_{i+1} and softmax(L_{i+1}); it is trained where loss_mask[i+2] = 1.

- EAGLE-1: fc([embed(t_{i+1}); f_i]) → decoder layers → f̂_{i+1}; logits through the target's frozen LM head.
  Loss: w_feature · SmoothL1(f̂, f) + w_token · soft-CE, features noised by U(−a, a).
- EAGLE-3: g_i = fc([h_low; h_mid; h_high]); the first layer's attention reads [norm(embed) ‖ norm(g)]; final norm;
  own LM head over a reduced draft vocabulary. Training-time test: at unrolled step s the token input shifts left by
  s, the drafter's own output of step s−1 replaces g, RoPE positions are i + s, targets shift by s, and the loss of
  step s (soft-CE against the target restricted to the draft vocabulary, where the target's argmax lies inside it)
  is weighted decay**s.
The target's embedding (and for EAGLE-1 its LM head) are shared frozen via `attach_target`, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from specdistill.distill import objectives
from specdistill.distill.drafters.modules import DraftDecoderLayer, RMSNorm, causal_bias, rotary_cos_sin
from specdistill.distill.errors import UserError
from specdistill.distill.target import FINAL_NORMED, TargetOutput


class EagleConfig(PretrainedConfig):
    """Shape of the draft layers (copied from the target's) plus what the drafter needs of its target.
    (transformers v5 configs are dataclasses: fields are declared, not set in `__init__`.)"""

    hidden_size: int = 4096
    num_hidden_layers: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vocab_size: int = 32000
    draft_vocab_size: int | None = None  # EAGLE-3; None: the full vocabulary
    feature_layers: list[int] | None = None  # target layer ids the drafter reads (-1: final normed state)
    target_hidden_size: int | None = None
    target_num_layers: int | None = None
    target_name_or_path: str | None = None
    target_revision: str | None = None

    def __post_init__(self, **kwargs: Any):
        self.draft_vocab_size = self.draft_vocab_size or self.vocab_size
        self.feature_layers = list(self.feature_layers or [FINAL_NORMED])
        self.target_hidden_size = self.target_hidden_size or self.hidden_size
        super().__post_init__(**kwargs)


class Eagle1Config(EagleConfig):
    model_type = "specdistill_eagle1"


class Eagle3Config(EagleConfig):
    model_type = "specdistill_eagle3"


@dataclass
class ObjectiveWeights:
    feature: float = 1.0  # SmoothL1 feature regression (EAGLE-1)
    token: float = 0.1  # soft cross-entropy against the target's distribution
    noise: float = 0.1  # U(−noise, noise) added to the input features
    ttt_steps: int = 1  # unrolled training-time-test steps (EAGLE-3)
    ttt_decay: float = 0.8  # weight of step s is ttt_decay**s


@dataclass
class DraftLoss:
    loss_sum: torch.Tensor  # Σ over masked positions (and decayed steps); divide by the batch's num_tokens
    num_tokens: torch.Tensor  # masked positions of step 0
    agree: torch.Tensor  # [ttt_steps] positions where the drafter's argmax equals the target's
    counted: torch.Tensor  # [ttt_steps] positions counted for agreement


def shift_left(x: torch.Tensor, shift: int, fill: float | int = 0) -> torch.Tensor:
    """x moved `shift` places left along the sequence dimension (dim 1), padded at the end with `fill`."""
    if shift == 0:
        return x
    padding = torch.full_like(x[:, :shift], fill)
    return torch.cat([x[:, shift:], padding], dim=1)


def trained_rows(loss_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Where the drafter is trained at unrolled step `step`: position i predicts token i + 2 + step (module doc), so
    it is trained when that token is under the loss mask → a boolean [batch, T − 2 − step] selector of the positions
    that have such a token. The LM head and the losses run on the selected rows only."""
    return loss_mask[:, 2 + step :].bool()


def rows(x: torch.Tensor, offset: int, selected: torch.Tensor) -> torch.Tensor:
    """The rows of x at positions i + offset for the positions i that `selected` marks → [count, ...]."""
    return x[:, offset : offset + selected.shape[1]][selected]


def sequence_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids 0..T−1 for every row of a right-padded batch."""
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)


def draft_config_from_target(
    config_class: type[EagleConfig], target_config: Any, feature_layers: Sequence[int], **overrides: Any
) -> EagleConfig:
    """A drafter config whose layer shape copies the target's."""
    rope_theta = getattr(target_config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    values = dict(
        hidden_size=target_config.hidden_size,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
        intermediate_size=target_config.intermediate_size,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_theta=rope_theta,
        max_position_embeddings=target_config.max_position_embeddings,
        vocab_size=target_config.vocab_size,
        feature_layers=list(feature_layers),
        target_hidden_size=target_config.hidden_size,
        target_num_layers=target_config.num_hidden_layers,
        target_name_or_path=getattr(target_config, "_name_or_path", None),
    )
    values.update(overrides)
    return config_class(**values)


def check_drafter_matches_target(drafter_config: EagleConfig, target_config: Any, where: str) -> None:
    """A drafter trained for one target cannot serve another: compare the shapes it depends on."""
    checks = [
        ("vocab size", drafter_config.vocab_size, target_config.vocab_size),
        ("hidden size", drafter_config.target_hidden_size, target_config.hidden_size),
        ("number of layers", drafter_config.target_num_layers, target_config.num_hidden_layers),
    ]
    for name, drafter_value, target_value in checks:
        if drafter_value is not None and drafter_value != target_value:
            raise UserError(
                f"{where}: the drafter was built for a target with {name} {drafter_value} "
                f"({drafter_config.target_name_or_path}), but this target has {target_value}. "
                "Use the target the drafter was trained for, or train a new drafter."
            )


class EagleDrafter(PreTrainedModel):
    config_class = EagleConfig
    base_model_prefix = "drafter"
    _no_split_modules = ["DraftDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def attach_target(self, embed_tokens: nn.Embedding, lm_head: nn.Linear) -> None:
        """Share the target's frozen embedding and LM head (held outside the module tree, so never saved)."""
        self.__dict__["_target_parts"] = (embed_tokens, lm_head)

    def _target_part(self, index: int) -> nn.Module:
        if "_target_parts" not in self.__dict__:
            raise RuntimeError("call attach_target(target.embed_tokens, target.lm_head) before using the drafter")
        return self.__dict__["_target_parts"][index]

    @property
    def target_embed(self) -> nn.Embedding:
        return self._target_part(0)

    @property
    def target_lm_head(self) -> nn.Linear:
        return self._target_part(1)

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, dtype)


class Eagle1Drafter(EagleDrafter):
    config_class = Eagle1Config

    def __init__(self, config: Eagle1Config):
        super().__init__(config)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layers = nn.ModuleList(
            [DraftDecoderLayer(config, input_norm=index > 0) for index in range(config.num_hidden_layers)]
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted next features: input_ids[i] is t_{i+1}, features[i] is f_i."""
        if position_ids is None:
            position_ids = sequence_positions(input_ids)
        bias = causal_bias(attention_mask, features.dtype)
        embeds = self.target_embed(input_ids).to(features.dtype)
        hidden = self.fc(torch.cat([embeds, features], dim=-1))
        cos, sin = self._rotary(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden, _ = layer(hidden, cos, sin, bias)
        return hidden

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        weights: ObjectiveWeights,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        features = target.features[FINAL_NORMED]
        noisy = objectives.uniform_noise(features, weights.noise, generator)
        predicted = self(shift_left(input_ids, 1), noisy, attention_mask)
        # position i predicts f_{i+1} and the target's distribution there; only trained rows reach the LM head
        selected = trained_rows(loss_mask)
        predicted = rows(predicted, 0, selected)
        target_features, target_logits = rows(features, 1, selected), rows(target.logits, 1, selected)
        draft_logits = self.target_lm_head(predicted)
        per_row = weights.feature * objectives.feature_regression(predicted, target_features)
        per_row = per_row + weights.token * objectives.soft_cross_entropy(draft_logits, target_logits)
        count = selected.sum().to(predicted.dtype)
        return DraftLoss(
            loss_sum=per_row.sum(),
            num_tokens=count,
            agree=objectives.top1_agreement(draft_logits, target_logits).sum().detach()[None],
            counted=count.detach()[None],
        )


class Eagle3Drafter(EagleDrafter):
    config_class = Eagle3Config

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        self.fc = nn.Linear(len(config.feature_layers) * config.target_hidden_size, config.hidden_size, bias=False)
        self.layers = nn.ModuleList(
            [DraftDecoderLayer(config, reads_embeddings=index == 0) for index in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # target_id = draft_id + d2t[draft_id]; t2d marks target ids inside the draft vocabulary (vLLM's layout)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.post_init()

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
        return self.fc(torch.cat([features[layer_id] for layer_id in self.config.feature_layers], dim=-1))

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
        weights: ObjectiveWeights,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        taps = {layer_id: objectives.uniform_noise(f, weights.noise, generator) for layer_id, f in target.features.items()}
        hidden = self.fuse(taps)
        bias = causal_bias(attention_mask, hidden.dtype)
        positions = sequence_positions(input_ids)
        caches: list[list] = [[] for _ in self.layers]
        draft_to_target = self.draft_to_target
        # the target's side once for every step: its argmax, whether that lies in the draft vocabulary (positions
        # whose best token the drafter cannot propose are not trained on) and its distribution over that vocabulary
        target_argmax = target.logits.argmax(dim=-1)
        restricted, argmax_in_vocab = objectives.restrict_to_draft_vocab(target.logits, draft_to_target, target_argmax)
        target_probs = restricted.float().softmax(dim=-1)
        loss_sum, agree, counted = hidden.new_zeros(()), [], []
        for step, decay in enumerate(objectives.decay_weights(weights.ttt_steps, weights.ttt_decay)):
            hidden = self.step(shift_left(input_ids, 1 + step), hidden, positions + step, bias, caches)
            # position i predicts token i + 2 + step from the target's logits at i + 1 + step; trained rows only
            selected = trained_rows(loss_mask, step)
            draft_logits = self.logits(rows(hidden, 0, selected))
            in_vocab = rows(argmax_in_vocab, 1 + step, selected).to(draft_logits.dtype)
            cross_entropy = objectives.cross_entropy_with_probs(draft_logits, rows(target_probs, 1 + step, selected))
            loss_sum = loss_sum + decay * (cross_entropy * in_vocab).sum()
            # agreement in the target's vocabulary, over every masked position (an honest acceptance proxy)
            draft_tokens = draft_to_target[draft_logits.argmax(dim=-1)]
            agree.append((draft_tokens == rows(target_argmax, 1 + step, selected)).sum().to(hidden.dtype).detach())
            counted.append(selected.sum().to(hidden.dtype))
            if step == 0:
                num_tokens = counted[0]
        return DraftLoss(loss_sum, num_tokens, torch.stack(agree), torch.stack(counted))


def select_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int, vocab_size: int) -> torch.Tensor:
    """The `draft_vocab_size` most frequent target ids under the loss mask (ties: lower id first), sorted."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    usable = min(len(token_counts), vocab_size)
    counts[:usable] = token_counts[:usable]
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: ties keep the lower id first
    return order[:draft_vocab_size].sort().values


AutoConfig.register(Eagle1Config.model_type, Eagle1Config)
AutoConfig.register(Eagle3Config.model_type, Eagle3Config)
AutoModel.register(Eagle1Config, Eagle1Drafter)
AutoModel.register(Eagle3Config, Eagle3Drafter)


def default_eagle3_layers(num_layers: int) -> list[int]:
    """EAGLE-3's reference taps (low, middle, high): inputs of layers 2, L/2 and L−3."""
    return [2, num_layers // 2, num_layers - 3]


def build_eagle_drafter(
    kind: str,
    target: Any,
    num_layers: int,
    feature_layers: Sequence[int],
    draft_vocab_size: int | None = None,
    token_counts: torch.Tensor | None = None,
) -> EagleDrafter:
    """A fresh drafter shaped after `target` (a FrozenTarget), sharing its embedding and LM head. EAGLE-3's draft
    vocabulary is the `draft_vocab_size` most frequent masked tokens of `token_counts`, its LM head starting from the
    target's rows for them."""
    config_class, model_class = (Eagle1Config, Eagle1Drafter) if kind == "eagle1" else (Eagle3Config, Eagle3Drafter)
    vocab_size = target.config.vocab_size
    draft_vocab_size = min(draft_vocab_size or vocab_size, vocab_size)
    config = draft_config_from_target(
        config_class, target.config, feature_layers, num_hidden_layers=num_layers, draft_vocab_size=draft_vocab_size
    )
    drafter = model_class(config)
    if kind == "eagle3":
        counts = token_counts if token_counts is not None else torch.zeros(vocab_size, dtype=torch.long)
        drafter.set_draft_vocab(select_draft_vocab(counts, draft_vocab_size, vocab_size), target.lm_head)
    drafter.attach_target(target.embed_tokens, target.lm_head)
    return drafter
