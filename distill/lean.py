"""The decoding forward: target, token-level drafter LM and EAGLE heads run on their own weights with few, fused
kernels (gpt-fast style) instead of through transformers' modules.

Why: at batch size 1 a small model's decoding step is mostly per-op overhead (mask building, module calls, casts)
and, on CPU, the matmul kernel's choice. Per decoder layer this runs

    x̂ = rms_norm(x)                              one call
    q, k, v = split(x̂ · W_qkv)                   the three projections fused into one matmul
    q, k ← q·cos + roll(q)·sin±, together         rotary on q and k in one go; cos, sin± from a table by position
    K, V ← cache + (k, v); a = sdpa(q, K, V)      the KV cache written in place; grouped-query attention, no repeat
    x = x + a · W_o
    g, u = split(rms_norm(x) · W_gate_up);  x = x + (silu(g) ⊙ u) · W_down

`roll(q)·sin±` is Llama's rotate_half(q)·sin: roll the head by head_dim/2 and negate sin's first half (bit-identical).

`Linear`: on CPU in float32 the matmuls run oneDNN's GEMM on a weight packed once: for the toy target's 43 matrices
on 1 thread, 1.02 ms for 5 rows (a verify, an extend, a tree level) against 2.34 ms with `F.linear`, and 0.90 ms
against 1.40 ms for one row. (A GEMV on a transposed copy is faster for one row in isolation, but two weight copies per matrix push the
target out of the L3 cache while a drafter runs beside it: measured slower end to end.) Elsewhere (GPU, bf16)
`F.linear`. The weights are copied when the lean view is built: build it after loading, and rebuild it if the
weights change (`lean_target` builds a frozen target's once).

Targets and drafter LMs: Llama-family decoder-only models (model_type llama, mistral without a sliding window,
qwen2, qwen3) with a static RoPE; `lean_causal_lm` returns None for anything else, which then decodes through
transformers (`FrozenTarget`). Feature-level drafter heads (distill/drafters/) build their decoding forward from
these same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdistill.distill.kv_cache import KVCache
from specdistill.distill.target import FINAL_NORMED, FrozenTarget, TargetOutput

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PACKED_ROWS = 8  # oneDNN packs the weight for this many rows; measured fastest for 1–12 rows on the toy target


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS)
    except (RuntimeError, AttributeError):  # a torch build without oneDNN's packed linear
        return None


class Linear:
    """y = x·Wᵀ + b; on CPU in float32 through oneDNN on a weight packed once (module doc)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.packed = _pack(weight)
        self.weight = weight if self.packed is None else None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fused_linear(*linears: Any) -> Linear:
    """One Linear computing several nn.Linear's outputs side by side."""
    biases = [linear.bias for linear in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else linear.weight.new_zeros(linear.out_features) for b, linear in zip(biases, linears)]
    )
    return Linear(torch.cat([linear.weight for linear in linears]), bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of heads x [..., head_dim] with `RotaryTable`'s cos, sin± (module doc)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class RotaryTable:
    """cos and sin± of every position up to a capacity that grows by doubling; a lookup per forward."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
        self.inv_freq, self.scaling, self.dtype = inv_freq.float(), scaling, dtype
        self.cos = self.sin = torch.empty(0, 2 * len(inv_freq), dtype=dtype, device=inv_freq.device)

    def _grow(self, needed: int) -> None:
        count = max(needed, 2 * len(self.cos), 4096)
        positions = torch.arange(count, device=self.inv_freq.device).float()
        angles = positions[:, None] * self.inv_freq  # Llama's layout: the angles repeated for both halves
        angles = torch.cat([angles, angles], dim=-1)
        half = self.inv_freq.shape[0]
        sign = torch.ones(2 * half, device=angles.device)
        sign[:half] = -1.0  # rotate_half(x)·sin = roll(x, d/2)·(−sin ‖ sin)
        self.cos = (angles.cos() * self.scaling).to(self.dtype)
        self.sin = (angles.sin() * self.scaling * sign).to(self.dtype)

    def __call__(self, positions: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [batch, rows], all below `bound` (known on the host: no device sync) → cos, sin±
        [batch, rows, 1, head_dim] (broadcast over heads)."""
        if bound > len(self.cos):
            self._grow(bound)
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]


@dataclass
class LeanLayer:
    """A Llama decoder layer (module doc). `input_norm` None: attention reads the hidden state as is."""

    input_norm: torch.Tensor | None
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    q_norm: torch.Tensor | None = None  # Qwen3: an RMSNorm over each query / key head before rotary
    k_norm: torch.Tensor | None = None
    output_copies: int = 1  # 2: the MLP writes 2H onto the residual repeated, [h ‖ h] (FSPAD's partial alignment)

    @classmethod
    def from_layer(cls, layer: Any, config: Any, head_dim: int) -> "LeanLayer":
        """From a transformers Llama-family decoder layer or a `DraftDecoderLayer` (the same module names)."""
        attention, mlp, input_norm = layer.self_attn, layer.mlp, layer.input_layernorm
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        return cls(
            input_norm=input_norm.weight.detach() if input_norm is not None else None,
            qkv=fused_linear(attention.q_proj, attention.k_proj, attention.v_proj),
            o=Linear(attention.o_proj.weight, attention.o_proj.bias),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=fused_linear(mlp.gate_proj, mlp.up_proj),
            down=Linear(mlp.down_proj.weight, mlp.down_proj.bias),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            eps=config.rms_norm_eps,
            q_norm=q_norm.weight.detach() if q_norm is not None else None,
            k_norm=k_norm.weight.detach() if k_norm is not None else None,
            output_copies=getattr(layer, "output_copies", 1),
        )

    def __call__(self, hidden, rotary, cache, mask, attention_input=None) -> torch.Tensor:
        if attention_input is None:
            attention_input = hidden if self.input_norm is None else rms_norm(hidden, self.input_norm, self.eps)
        hidden = hidden + self.attend(attention_input, rotary, cache, mask)
        gate, up = self.gate_up(rms_norm(hidden, self.post_norm, self.eps)).chunk(2, dim=-1)
        residual = hidden if self.output_copies == 1 else hidden.repeat(1, 1, self.output_copies)
        return residual + self.down(F.silu(gate) * up)

    def attend(self, x: torch.Tensor, rotary, cache, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of x's rows after the cached ones. `mask` [batch, 1, rows, cached + rows] boolean (True =
        visible), or None: causal among the rows, which then must start an empty cache (or be a single row)."""
        batch, rows, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(batch, rows, heads + 2 * kv_heads, self.head_dim)
        qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
        if self.q_norm is not None:
            qk = torch.cat(
                [rms_norm(qk[:, :, :heads], self.q_norm, self.eps), rms_norm(qk[:, :, heads:], self.k_norm, self.eps)],
                dim=2,
            )
        cos, sin = rotary
        qk = rotate(qk, cos, sin)
        causal = mask is None and rows > 1
        if causal and cache.length:
            raise ValueError("several rows after cached ones need an explicit mask")
        keys, values = cache.update(qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(
            qk[:, :, :heads].transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=heads != kv_heads
        )
        return self.o(out.transpose(1, 2).reshape(batch, rows, -1))


def position_bound(cache: KVCache, input_ids: torch.Tensor) -> int:
    """A new entry's position never exceeds the number of entries before it (chain, tree levels, extends)."""
    return cache.length + input_ids.shape[1]


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot decode through the lean forward, or None when it can."""
    if not callable(getattr(model, "get_decoder", None)):
        return f"{type(model).__name__} is not a transformers causal LM"
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3", "yarn"):
        return f"RoPE type {getattr(rotary, 'rope_type', None)!r} (changes with the sequence length)"
    return None


class LeanCausalLM:
    """A Llama-family transformers causal LM for decoding (module doc), filling a `KVCache`."""

    def __init__(self, model: Any):
        config, decoder = model.config, model.get_decoder()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        with torch.no_grad():
            self.embed = decoder.embed_tokens.weight.detach()
            self.layers = [LeanLayer.from_layer(layer, config, head_dim) for layer in decoder.layers]
            self.norm = decoder.norm.weight.detach()
            lm_head = model.get_output_embeddings()
            self.lm_head = Linear(lm_head.weight, lm_head.bias)
        self.eps = config.rms_norm_eps
        rotary = decoder.rotary_emb
        self.rotary = RotaryTable(rotary.inv_freq, rotary.attention_scaling, self.embed.dtype)

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
        last_logits_only: bool = False,
    ) -> TargetOutput:
        """Logits (all rows, or the last one) and the features at `feature_layers` (FrozenTarget's ids)."""
        hidden = F.embedding(input_ids, self.embed)
        rotary = self.rotary(position_ids, position_bound(cache, input_ids))
        features = {}
        for index, layer in enumerate(self.layers):
            if index in feature_layers:
                features[index] = hidden
            hidden = layer(hidden, rotary, cache.layer(index), mask)
        hidden = rms_norm(hidden, self.norm, self.eps)
        if FINAL_NORMED in feature_layers:
            features[FINAL_NORMED] = hidden
        logits = self.lm_head(hidden[:, -1:] if last_logits_only else hidden)
        return TargetOutput(logits=logits, features=features, past_key_values=cache)


def lean_causal_lm(model: Any) -> LeanCausalLM | None:
    """The lean view of `model`, or None when it must decode through transformers (`unsupported_reason`)."""
    return LeanCausalLM(model) if unsupported_reason(model) is None else None


def lean_target(target: FrozenTarget) -> LeanCausalLM | None:
    """`lean_causal_lm` of a frozen target, built once (its weights never change) and shared by every decoder and
    EAGLE-1 head that uses it: one packed copy of the weights stays in cache."""
    if "_lean" not in target.__dict__:
        target.__dict__["_lean"] = lean_causal_lm(target.model)
    return target.__dict__["_lean"]
