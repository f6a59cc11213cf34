"""τ during training: the evaluator's own speculative decoder (eval/decoding.py, chain, greedy) run with the drafter's
current weights on a few validation prompts, so every run logs the real τ and α beside the top-1 proxy.

A prompt is a validation record's tokens before its first trained token (the conversation up to the first assistant
turn). Each process decodes its share of the prompts and the counts are summed over processes, so

    τ   = Σ tokens committed by decoding steps ÷ Σ decoding steps        (as `specdistill eval` defines it)
    α_k = Σ accepted at draft position k ÷ Σ times position k was reached

The decoder drafts from a copy of the drafter in the target's dtype (training keeps float32 master weights; the
copy is dropped afterwards), so measuring never touches the weights being trained.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from specdistill.distill.target import FrozenTarget
from specdistill.eval.decoding import Decoder, DecodingConfig


def validation_prompts(rows: Any, count: int) -> list[list[int]]:
    """The tokens before the first trained token of the first `count` records that have both a prompt and a trained
    token (a record trained from its first token has no prompt to decode from)."""
    prompts: list[list[int]] = []
    for row in rows:
        if len(prompts) == count:
            break
        first = next((position for position, value in enumerate(row["loss_mask"]) if value), 0)
        if first > 0:
            prompts.append(list(row["input_ids"][:first]))
    return prompts


def snapshot_drafting(drafter: nn.Module, target: FrozenTarget, device: torch.device) -> Any:
    """The evaluator's `Drafting` over a copy of `drafter` in the target's dtype. The copy shares the target (the memo
    maps it to itself), so only the drafter's own weights are copied."""
    attached = drafter.__dict__.get("_attached_target")
    memo = {id(attached): attached} if attached is not None else {}
    frozen = copy.deepcopy(drafter, memo).to(device=device, dtype=target.model.dtype).eval()
    if hasattr(frozen, "attach_target"):
        frozen.attach_target(target)
    return frozen.drafting(device)


@torch.no_grad()
def decode_counts(drafting: Any, target: FrozenTarget, prompts: Sequence[list[int]], gamma: int,
                  max_new_tokens: int, eos_token_ids: set[int]) -> torch.Tensor:
    """[committed tokens, decoding steps, reached_1..γ, accepted_1..γ] summed over `prompts` (float64, so the
    processes' counts can be summed with one reduce). γ is capped at what the drafter can draft."""
    if drafting.max_depth is not None:
        gamma = min(gamma, drafting.max_depth)
    config = DecodingConfig(method="chain", gamma=gamma, temperature=0.0, max_new_tokens=max_new_tokens)
    decoder = Decoder(target, drafting, config, eos_token_ids)
    counts = torch.zeros(2 + 2 * gamma, dtype=torch.float64)
    for prompt in prompts:
        generation = decoder.generate(prompt)
        counts[0] += sum(generation.accept_lengths)
        counts[1] += len(generation.accept_lengths)
        counts[2 : 2 + gamma] += torch.tensor(generation.reached, dtype=torch.float64)
        counts[2 + gamma :] += torch.tensor(generation.accepted, dtype=torch.float64)
    return counts


def tau_metrics(counts: torch.Tensor) -> dict[str, float]:
    """`val_tau` and `val_alpha_pos{k}` (k from 1) from summed `decode_counts`."""
    gamma = (len(counts) - 2) // 2
    reached, accepted = counts[2 : 2 + gamma], counts[2 + gamma :]
    metrics = {"val_tau": float(counts[0] / counts[1].clamp(min=1))}
    metrics.update({f"val_alpha_pos{k + 1}": float(accepted[k] / reached[k].clamp(min=1)) for k in range(gamma)})
    return metrics
