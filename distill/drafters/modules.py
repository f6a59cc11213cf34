"""Building blocks shared by the feature-level drafters: RMSNorm, rotary embeddings, a Llama decoder layer whose
attention may read a wider input (EAGLE-3: normed embedding ‖ normed feature), and attention for the unrolled
training-time test.

Training-time test (EAGLE-3): at unrolled step s the queries of position i attend causally to the step-0 keys
(positions ≤ i) and to the keys of position i itself from steps 1..s (the drafter's own earlier guesses there):

    scores = [ q·K0ᵀ/√d + causal_bias  |  q·K1/√d  | … |  q·Ks/√d ]      (the last s columns are per position)
    out    = softmax(scores)[:, :T] · V0 + Σ_j softmax(scores)[:, T+j−1] · Vj

which is exactly attention over those keys under a mask, without materialising a [T, s·T] mask.
Module names follow vLLM's / SGLang's EAGLE-3 layout (`self_attn.q_proj`, `hidden_norm`, …) so export is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specdistill.distill.masks import additive_bias



class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Llama's rotary frequencies θ^(−2k/d), k < d/2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos and sin of the rotary angles, [batch, seq, head_dim] (Llama's half-split layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [batch, seq, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; rotate pairs (x_k, x_{k+d/2})."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def causal_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, seq, seq] bias: query i sees keys j ≤ i that are not padding."""
    seq = attention_mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    visible = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return additive_bias(visible, dtype)


class DraftAttention(nn.Module):
    def __init__(self, hidden_size: int, input_size: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(input_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(input_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(input_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, count, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        earlier_steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention of x's queries. Without `earlier_steps`: causal self-attention (TTT step 0). With them (a list
        whose first entry holds step 0's keys and values, then steps 1..s−1): TTT step s as in the module doc.
        Returns the output and this step's (keys, values) for the next steps. (Decoding runs distill/lean.py.)"""
        groups = self.num_heads // self.num_kv_heads
        q = apply_rotary(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if not earlier_steps:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            keys0, values0 = earlier_steps[0]
            diagonal_keys = [keys for keys, _ in earlier_steps[1:]] + [k]
            diagonal_values = [values for _, values in earlier_steps[1:]] + [v]
            scale = 1.0 / math.sqrt(self.head_dim)
            scores0 = q @ keys0.transpose(-1, -2) * scale + bias  # [batch, heads, seq, seq]
            scores_diag = torch.stack([(q * keys).sum(-1) for keys in diagonal_keys], dim=-1) * scale  # [b, h, seq, s]
            weights = torch.cat([scores0, scores_diag], dim=-1).float().softmax(dim=-1).to(q.dtype)
            seq = scores0.shape[-1]
            out = weights[..., :seq] @ values0
            out = out + (weights[..., seq:, None] * torch.stack(diagonal_values, dim=-2)).sum(dim=-2)
        batch, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, output_size: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, output_size or hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """A Llama decoder layer. `reads_embeddings=True` is EAGLE-3's first layer: attention reads
    [input_layernorm(embeds) ‖ hidden_norm(hidden)] (2H) and the residual is `hidden`. `input_norm=False` drops the
    input norm (EAGLE-1's first layer, whose input is the fc output). `output_copies=2` widens the output to 2H: the
    MLP writes 2H onto the residual repeated twice, [h ‖ h] (FSPAD's partial alignment)."""

    def __init__(self, config, reads_embeddings: bool = False, input_norm: bool = True, output_copies: int = 1):
        super().__init__()
        hidden = config.hidden_size
        self.reads_embeddings, self.output_copies = reads_embeddings, output_copies
        # EAGLE 3.1 / vLLM's `norm_before_residual`: the first layer's residual is the normed feature, not the raw one
        self.norm_before_residual = reads_embeddings and bool(getattr(config, "norm_before_residual", False))
        self.self_attn = DraftAttention(
            hidden, 2 * hidden if reads_embeddings else hidden, config.num_attention_heads, config.num_key_value_heads
        )
        self.mlp = MLP(hidden, config.intermediate_size, output_copies * hidden)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps) if (input_norm or reads_embeddings) else None
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps) if reads_embeddings else None
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, bias, embeds=None, earlier_steps=None):
        residual = hidden
        if self.reads_embeddings:
            normed = self.hidden_norm(hidden)
            attention_input = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
            residual = normed if self.norm_before_residual else hidden
        else:
            attention_input = self.input_layernorm(hidden) if self.input_layernorm is not None else hidden
        attended, keys_values = self.self_attn(attention_input, cos, sin, bias, earlier_steps)
        hidden = residual + attended
        hidden = hidden.repeat(1, 1, self.output_copies) + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, keys_values
