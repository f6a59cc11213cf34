"""Attention masks for decoding with a KV cache, without allocating a full-size mask per step.

A verify (or tree-drafting) call feeds q new tokens after `prefix` cached ones. Every new token sees the whole
prefix; among themselves they follow a small [q, t] block (causal for a chain, ancestors for a tree, where t ≥ q
counts earlier drafted entries too). `PrefixMask` keeps one all-True boolean buffer, writes the block into its
columns [prefix, prefix + t) and hands out a view; the columns are restored to True before the next block.
"""

from __future__ import annotations

import torch

from specdistill.distill.errors import UserError

MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take an explicit 4-D mask (tree and chain verify)


class PrefixMask:
    def __init__(self, device: torch.device | str = "cpu", rows: int = 64, capacity: int = 1024):
        self.buffer = torch.ones(rows, capacity, dtype=torch.bool, device=device)
        self.written: tuple[int, int, int] | None = None  # (rows, first column, last column) of the last block

    def __call__(self, prefix: int, block: torch.Tensor) -> torch.Tensor:
        """Boolean [1, 1, q, prefix + t] mask (True = visible) for q queries after `prefix` cached keys."""
        rows, columns = block.shape
        if self.written is not None:
            written_rows, start, end = self.written
            self.buffer[:written_rows, start:end] = True
        if rows > self.buffer.shape[0] or prefix + columns > self.buffer.shape[1]:
            self.buffer = torch.ones(
                max(rows, self.buffer.shape[0]),
                max(prefix + columns, 2 * self.buffer.shape[1]),
                dtype=torch.bool,
                device=self.buffer.device,
            )
        self.buffer[:rows, prefix : prefix + columns] = block
        self.written = (rows, prefix, prefix + columns)
        return self.buffer[None, None, :rows, : prefix + columns]


def causal_block(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def check_attention_implementation(model_config, where: str) -> None:
    """Verification passes its own 4-D mask (a tree cannot be expressed as `is_causal`)."""
    implementation = getattr(model_config, "_attn_implementation", "sdpa") or "sdpa"
    if implementation not in MASKED_ATTENTION:
        raise UserError(
            f"{where}: attention implementation '{implementation}' cannot take the tree/verification mask; "
            f"load the model with one of {', '.join(MASKED_ATTENTION)} (e.g. target.attn_implementation=sdpa)"
        )


def as_model_mask(mask: torch.Tensor | None, model_config, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA takes the boolean mask as is; transformers' eager attention adds it to the scores."""
    if mask is None or getattr(model_config, "_attn_implementation", "sdpa") != "eager":
        return mask
    return additive_bias(mask, dtype)


def additive_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean visibility mask (True: visible) as the additive bias attention adds to its scores."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
