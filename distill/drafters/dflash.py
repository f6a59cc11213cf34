"""DFlash (`drafter=dflash`, arXiv 2602.06036): a block drafter that drafts a whole round in one forward, reading the
target's hidden states only as attention context.

    context   c_i = hidden_norm(fc([h_l1; h_l2; …]_i)) at every position i the target has run (the tapped layers'
              states, fused), turned into extra keys/values in every draft layer: k = RoPE(k_norm(W_k c_i), i),
              v = W_v c_i (the layer's own projections)
    block     [t_n, mask × (B − 1)] at positions n .. n + B − 1, where t_n is the token the target just chose; the
              target's embeddings; Qwen3-style layers (q_norm / k_norm per head); a block attends to the context
              of positions < n and to its whole block (bidirectional)
    drafts    block position k (1 ≤ k < B) → the final norm and the target's LM head → t_{n+k}

So a round's B − 1 drafts cost one forward, and nothing of the drafter's own is cached across rounds: the context is
the target's. Training (objective=dflash) picks random anchors n per sequence (up to `objective.max_anchors`), runs
every block at once (each seeing its own context prefix and block), and weighs block position k's soft cross-entropy
against the target's distribution by exp(−(k − 1)/γ), γ = `objective.position_decay` (4).

Taps (`drafter.feature_layers`, our layer-input ids): DFlash's five, spread from layer 1 to L − 3 (vLLM names them
by the layer whose output they are: `dflash_config.target_layer_ids` = ours − 1, so layer 0's input, the embeddings,
cannot be exported). Mask token: feature.py's `choose_mask_token`.

    specdistill train drafter=dflash objective=dflash data_dir=...       # experiment=dflash: the paper's knobs
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from specdistill.distill import objectives
from specdistill.distill.drafters.engine_layouts import (
    EngineLayout,
    ExportUnsupported,
    ascending_taps,
    llama_layer_config,
)
from specdistill.distill.drafters.feature import (
    BuildContext,
    DraftLoss,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterOptions,
    choose_mask_token,
    draft_config_from_target,
)
from specdistill.distill.drafters.modules import MLP, RMSNorm, apply_rotary
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.drafting import Drafting, ParallelRounds
from specdistill.distill.errors import UserError
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.masks import additive_bias
from specdistill.distill.lean import LeanLayer, Linear, RotaryTable, fused_linear, rms_norm, rotate
from specdistill.distill.drafters.modules import rope_inv_freq
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.target import TargetOutput, check_feature_layers


class DFlashConfig(FeatureDrafterConfig):
    model_type = "specdistill_dflash"
    block_size: int = 16  # B: the anchor plus B − 1 drafted positions per forward
    mask_token_id: int = 0


@dataclass
class DFlashOptions(FeatureDrafterOptions):
    kind: str = "dflash"
    num_layers: int = 5  # DFlash's draft layers
    block_size: int = 16  # B: one forward drafts B − 1 tokens; decoding drafts at most that many
    mask_token_id: Optional[int] = None  # None: the tokenizer's mask token, else the training data's least used id


@dataclass
class DFlashObjective(FeatureObjective):
    """DFlash's loss (module doc). No feature loss and no training-time test."""

    feature_weight: float = 0.0
    token_weight: float = 1.0
    noise: float = 0.0
    max_anchors: int = 512  # blocks per sequence (all positions when fewer)
    position_decay: float = 4.0  # γ: block position k weighs exp(−(k − 1)/γ)


def default_dflash_layers(num_layers: int) -> list[int]:
    """Five layer inputs spread evenly from layer 1 to L − 3 (the DFlash checkpoints' spread), fewer where the target
    is too shallow for five distinct ones; never layer 0's input (the embeddings, which engines cannot tap)."""
    if num_layers < 2:
        raise UserError(f"DFlash taps layer inputs 1..L−1 and the target has {num_layers} layer(s): set "
                        "drafter.feature_layers by hand or pick another drafter")
    last = max(1, num_layers - 3) if num_layers >= 8 else num_layers - 1
    return sorted({round(1 + k * (last - 1) / 4) for k in range(5)})


class DFlashAttention(nn.Module):
    """Qwen3 attention (per-head q_norm / k_norm before RoPE) whose queries also see context keys/values made from
    the fused target states by the same projections."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        return x.view(*x.shape[:2], count, self.head_dim).transpose(1, 2)  # [batch, heads, rows, head_dim]

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = apply_rotary(self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads)), cos, sin)
        values = self._heads(self.v_proj(x), self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: tuple[torch.Tensor, ...],
                block_size: int) -> torch.Tensor:
        """x: [batch, blocks · B, H], block after block; `context` = (keys, values, bias): the context's keys and
        values [batch, heads, T, head_dim] and the additive bias [batch, 1, blocks · B, T] that hides, from each
        block, the context at and after its anchor. Within a block every row sees every row (bidirectional).
        Computed per block ([blocks, B, B] scores), not as one [blocks · B]² matrix."""
        batch, rows, _ = x.shape
        blocks = rows // block_size
        queries = apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), cos, sin)
        keys, values = self.keys_values(x, cos, sin)
        context_keys, context_values, context_bias = context
        scale = 1.0 / math.sqrt(self.head_dim)
        context_scores = queries @ context_keys.transpose(-1, -2) * scale + context_bias  # [b, h, rows, T]

        def per_block(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, self.num_heads, blocks, block_size, self.head_dim)

        block_scores = per_block(queries) @ per_block(keys).transpose(-1, -2) * scale  # [b, h, blocks, B, B]
        block_scores = block_scores.reshape(batch, self.num_heads, rows, block_size)
        weights = torch.cat([context_scores, block_scores], dim=-1).float().softmax(dim=-1).to(queries.dtype)
        length = context_keys.shape[-2]
        out = weights[..., :length] @ context_values
        block_weights = weights[..., length:].reshape(batch, self.num_heads, blocks, block_size, block_size)
        out = out + (block_weights @ per_block(values)).reshape(batch, self.num_heads, rows, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, rows, -1))


class DFlashLayer(nn.Module):
    """A Qwen3 decoder layer (pre-norm attention and MLP), its attention reading the target's context too. The module
    names are Qwen3's (and vLLM's DFlash layout), so `LeanLayer.from_layer` builds its decoding forward."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, context_states, context_cos, context_sin, context_bias, block_size):
        keys, values = self.self_attn.keys_values(context_states, context_cos, context_sin)
        attended = self.self_attn(self.input_layernorm(x), cos, sin, (keys, values, context_bias), block_size)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(FeatureDrafter):
    config_class = DFlashConfig
    Options = DFlashOptions
    Objectives = {"dflash": DFlashObjective}
    _no_split_modules = ["DFlashLayer"]

    def __init__(self, config: DFlashConfig):
        super().__init__(config)
        self.fc = nn.Linear(len(config.feature_layers) * config.target_hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList([DFlashLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    @classmethod
    def default_feature_layers(cls, num_layers: int) -> tuple[int, ...]:
        return tuple(default_dflash_layers(num_layers))

    @classmethod
    def build(cls, options: DFlashOptions, context: BuildContext) -> "DFlashDrafter":
        target = context.target
        layers = list(options.feature_layers or cls.default_feature_layers(target.num_layers))
        check_feature_layers(layers, target.num_layers, "drafter.feature_layers")
        if options.block_size < 2:
            raise UserError(f"drafter.block_size={options.block_size} is out of range: it must be an integer ≥ 2 (the "
                            "anchor and at least one drafted position; the paper's is 16)")
        vocab_size = target.config.vocab_size
        config = draft_config_from_target(
            DFlashConfig, target.config, layers, num_hidden_layers=options.num_layers, block_size=options.block_size,
            mask_token_id=choose_mask_token(options.mask_token_id, context, vocab_size), **cls.stop_head_field(options))
        drafter = cls(config)
        drafter.record_target(context)
        drafter.attach_target(target)
        return drafter

    @classmethod
    def check_objective(cls, objective: DFlashObjective) -> None:
        if objective.feature_weight != 0 or objective.ttt_steps != 1:
            raise UserError(f"objective.feature_weight={objective.feature_weight}, objective.ttt_steps="
                            f"{objective.ttt_steps}: DFlash has no feature loss and no training-time test; use "
                            "objective=dflash")
        if objective.max_anchors < 1 or objective.position_decay <= 0:
            raise UserError(f"objective.max_anchors={objective.max_anchors}, objective.position_decay="
                            f"{objective.position_decay}: both must be positive")

    @property
    def max_depth(self) -> int:
        return self.config.block_size - 1

    def identity(self) -> dict:
        return {**super().identity(), "block_size": self.config.block_size, "mask_token_id": self.config.mask_token_id}

    def trained_rows(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """The normaliser's positions: every token the target's context could predict (a block's drafts are a random
        sample of them, so the loss is scaled to a per-token mean, see `training_loss`)."""
        return loss_mask[:, 1:].bool()

    # ---- the forward ----

    def context_states(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """c = hidden_norm(fc(taps)) per position."""
        taps = torch.cat([features[layer_id] for layer_id in self.config.feature_layers], dim=-1)
        return self.hidden_norm(self.fc(taps))

    def hidden_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.context_states(features)

    def block_forward(self, anchor_tokens: torch.Tensor, anchors: torch.Tensor, context: torch.Tensor,
                      context_mask: torch.Tensor) -> torch.Tensor:
        """Blocks [anchor token, mask × (B − 1)] at anchors[j] .. anchors[j] + B − 1 (`anchor_tokens` [batch,
        blocks]) over the context states [batch, T, H] of which each block sees positions < its anchor (and not
        padding: `context_mask`) → the final-normed rows [batch, blocks, B, H]."""
        batch, blocks = anchor_tokens.shape
        block_size, length, dtype = self.config.block_size, context.shape[1], context.dtype
        tokens = anchor_tokens.new_full((batch, blocks, block_size), self.config.mask_token_id)
        tokens[:, :, 0] = anchor_tokens
        x = self.target_embed(tokens.view(batch, -1)).to(dtype)
        positions = (anchors[:, None] + torch.arange(block_size, device=anchors.device)).flatten()
        cos, sin = self._rotary(positions[None].expand(batch, -1), dtype)
        context_positions = torch.arange(length, device=anchors.device)
        context_cos, context_sin = self._rotary(context_positions[None].expand(batch, -1), dtype)
        sees = context_positions[None] < anchors.repeat_interleave(block_size)[:, None]  # [blocks · B, T]
        sees = sees[None] & context_mask.bool()[:, None, :]
        bias = additive_bias(sees, dtype)[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, context, context_cos, context_sin, bias, block_size)
        return self.norm(x).view(batch, blocks, block_size, -1)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target_lm_head(hidden)

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        objective: DFlashObjective,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        """Σ_k exp(−(k − 1)/γ) · soft CE of block position k against the target's distribution of the token there,
        over random anchors (the same anchors for every row; a row with nothing trained there adds nothing), scaled
        so that loss_sum ÷ trained_rows is the weighted mean over the drafted rows."""
        length, block_size = input_ids.shape[1], self.config.block_size
        context = self.context_states(self.noisy_taps(target, objective, generator))
        candidates = loss_mask[:, 1:].bool().any(dim=0).nonzero().flatten()  # anchors whose next token is trained
        order = torch.randperm(len(candidates), generator=generator, device=candidates.device)
        anchors = candidates[order[: objective.max_anchors]].sort().values
        out = self.block_forward(input_ids[:, anchors], anchors, context, attention_mask)
        offsets = torch.arange(1, block_size, device=anchors.device)
        predicted = anchors[:, None] + offsets  # [blocks, B − 1]: the token each drafted row predicts
        inside = predicted < length
        clamped = predicted.clamp(max=length - 1)
        selected = inside[None] & loss_mask[:, clamped].bool()  # [batch, blocks, B − 1]
        drafts = out[:, :, 1:][selected]
        rows_of, blocks_of, offsets_of = selected.nonzero(as_tuple=True)
        # the target's distribution of token a + k, read at the selected rows only (not a [batch, blocks, B, V] copy)
        target_logits = target.logits[rows_of, clamped[blocks_of, offsets_of] - 1]
        draft_logits = self.vocab_logits(drafts)
        per_row = objective.token_weight * objectives.soft_cross_entropy(draft_logits, target_logits)
        weights = torch.exp(-(offsets - 1).float() / objective.position_decay).expand_as(selected)[selected]
        trained = self.trained_rows(loss_mask).sum().float()
        loss_sum = (weights * per_row).sum() / weights.sum().clamp(min=1e-6) * trained
        with torch.no_grad():
            agreeing = (draft_logits.argmax(dim=-1) == target_logits.argmax(dim=-1)).float()
            position = offsets.expand_as(selected)[selected] - 1
            agree = torch.zeros(block_size - 1, device=drafts.device).index_add_(0, position, agreeing)
            counted = torch.zeros(block_size - 1, device=drafts.device).index_add_(0, position,
                                                                                  torch.ones_like(agreeing))
        return DraftLoss(loss_sum, trained, agree, counted)

    def training_draft_logits(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor],
                              committed: int) -> torch.Tensor:
        """feature.py's protocol: one block anchored at input_ids[committed] over the context of the committed
        positions; row j is block position j + 1 (the drafts never read the drafted tokens)."""
        drafted = input_ids.shape[1] - committed
        if drafted > self.config.block_size - 1:
            raise ValueError(f"a block drafts at most {self.config.block_size - 1} tokens, not {drafted}")
        context = self.context_states(features)[:, :committed]
        anchors = torch.tensor([committed], device=input_ids.device)
        out = self.block_forward(input_ids[:, committed : committed + 1], anchors, context,
                                 torch.ones_like(input_ids[:, :committed]))
        return self.vocab_logits(out[0, 0, 1 : 1 + drafted])

    def drafting(self, device: torch.device | str) -> "DFlashDrafting":
        return DFlashDrafting(self, device)

    # ---- serving engines' layouts ----

    export_formats = ("vllm",)
    speculative_methods = {"vllm": "dflash"}

    def engine_layout(self, format: str, gamma: int) -> EngineLayout:
        """vLLM's `DFlashDraftModel` (qwen3_dflash.py): Qwen3 layer names, `fc` (columns in ascending tap order) and
        `hidden_norm`, `dflash_config` with the taps as layer *outputs* (ours − 1); no embeddings, LM head or
        `mask_hidden` (vLLM shares the target's and refuses the last)."""
        config, where = self.config, f"format={format}"
        if format != "vllm":
            raise ExportUnsupported(f"{where}: a DFlash drafter exports to vllm or hf")
        taps, _, columns = ascending_taps(list(config.feature_layers), config.target_hidden_size, where)
        if taps[0] < 1:
            raise ExportUnsupported(f"{where}: drafter.feature_layers {taps} taps layer 0's input (the embeddings), "
                                    "which vLLM's DFlash cannot name (it counts layer outputs); train with taps ≥ 1")
        tensors = self.engine_tensors()
        tensors["fc.weight"] = tensors["fc.weight"][:, columns].contiguous()
        engine_config = {
            **llama_layer_config(config, self.dtype),  # Qwen3's config reads the same fields (its q/k norms have none)
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "target_hidden_size": config.target_hidden_size,
            "block_size": config.block_size,
            "dflash_config": {"mask_token_id": config.mask_token_id, "target_layer_ids": [tap - 1 for tap in taps],
                              "block_size": config.block_size, "causal": False},
        }
        return EngineLayout(format, engine_config, tensors)


class DFlashDrafting(ParallelRounds, Drafting):
    """DFlash's decoding forward on distill/lean.py's ops: `begin`/`extend` write the new context keys/values (one
    per position the target ran) into each layer's cache, run the block [the target's new token, mask × (B − 1)] over
    it, and keep its B − 1 draft rows (the decoder reads the first `draft_depth`); the block's own entries are dropped
    before the next round."""

    def __init__(self, drafter: DFlashDrafter, device: torch.device | str):
        super().__init__(device)
        config = drafter.config
        self.feature_layers = drafter.feature_layers
        self.mask_token_id = config.mask_token_id
        self.block_size = config.block_size
        self.max_depth = self.draft_depth = config.block_size - 1
        head_dim = config.hidden_size // config.num_attention_heads
        self.head_dim, self.num_kv_heads, self.eps = head_dim, config.num_key_value_heads, config.rms_norm_eps
        with torch.no_grad():
            self.embed = drafter.target_embed.weight.detach()
            self.lm_head = Linear(drafter.target_lm_head.weight)
            self.fc = Linear(drafter.fc.weight)
            self.hidden_norm = drafter.hidden_norm.weight.detach()
            self.norm = drafter.norm.weight.detach()
            self.layers = [LeanLayer.from_layer(layer, config, head_dim) for layer in drafter.layers]
            self.context_kv = [fused_linear(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in drafter.layers]
        self.rotary = RotaryTable(rope_inv_freq(head_dim, config.rope_theta, self.embed.device), 1.0, self.embed.dtype)
        self.cache = KVCache()

    def begin(self, prompt_ids, features, first_token):
        self.length = 0
        return self._round(first_token, features)

    def extend(self, tokens, features):
        return self._round(tokens[:, -1:], features)

    def _round(self, anchor: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
        self.cache.truncate(self.length)  # drop the previous block
        taps = torch.cat([features[layer_id] for layer_id in self.feature_layers], dim=-1)
        context = rms_norm(self.fc(taps), self.hidden_norm, self.eps)
        # the whole trained block even when fewer drafts are used: its rows see each other, so a shorter block
        # would be another computation than the one trained (and than vLLM's, which runs γ + 1 = B rows)
        count, rows = context.shape[1], self.block_size
        bound = self.length + count + rows
        cos, sin = self.rotary(self._positions(count), bound)
        for index, (layer, context_kv) in enumerate(zip(self.layers, self.context_kv)):
            keys, values = context_kv(context).view(1, count, 2 * self.num_kv_heads, self.head_dim).chunk(2, dim=2)
            keys = rms_norm(keys, layer.k_norm, self.eps)
            keys = rotate(keys, cos, sin)
            self.cache.layer(index).update(keys.transpose(1, 2), values.transpose(1, 2))
        self.length += count
        block = torch.cat([anchor, anchor.new_full((1, rows - 1), self.mask_token_id)], dim=1)
        hidden = F.embedding(block, self.embed).to(context.dtype)
        rotary = self.rotary(self._positions(rows), bound)
        visible = torch.ones(1, 1, rows, self.length + rows, dtype=torch.bool, device=self.device)  # bidirectional
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, self.cache.layer(index), visible)
        self.round_logits = self.lm_head(rms_norm(hidden[0, 1:], self.norm, self.eps))
        return self.round_logits[0]


register_kind("dflash", DFlashDrafter)
