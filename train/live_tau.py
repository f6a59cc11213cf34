"""τ during training: the evaluator's own speculative decoder (distill/decoding.py, with `train.tau`'s decoding settings,
by default a greedy chain of γ = 5) run with the drafter's current weights on a few validation prompts, so every run
logs the real τ and α beside the top-1 proxy.

A prompt is a real prefix of a validation record, so τ is measured continuing real text: the tokens before its first
trained token (the conversation up to the first assistant turn), or, where those are too few to be a context (a text
record is trained from its second token), the record's own first half, at most `MAX_PREFIX_TOKENS`. Decoding from a
1-token prompt would measure unconditional generation instead, not the continuation of real text that `specdistill
eval` measures. The main process decodes them (the others add zeros to one reduce), and

    τ   = Σ tokens committed by decoding steps ÷ Σ decoding steps        (as `specdistill eval` defines it)
    α_k = Σ accepted at draft position k ÷ Σ times position k was reached

The recipe hands the decoder a copy of the drafter loaded from its saved weights, as `specdistill eval` loads one, so
measuring never touches the weights being trained.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from specdistill.distill.target import FrozenTarget
from specdistill.distill.decoding import Decoder, DecodingConfig


# A prompt shorter than this is no real context: a text record's is 1 token, while a chat template's role markers and
# a user turn take more.
MIN_PROMPT_TOKENS = 4
MAX_PREFIX_TOKENS = 256  # a text record's prompt: its first half, capped so the prefill stays cheap


def validation_prompts(rows: Any, count: int) -> list[list[int]]:
    """The prompts of the first `count` records that have one (module doc): the tokens before the first trained token,
    else the record's first half (capped); a record too short for either is left out."""
    prompts: list[list[int]] = []
    for row in rows:
        if len(prompts) == count:
            break
        # the tokens before the first trained one; too few for a context (a text record): the record's first half
        length = next((position for position, value in enumerate(row["loss_mask"]) if value), 0)
        if length < MIN_PROMPT_TOKENS:
            length = min(len(row["input_ids"]) // 2, MAX_PREFIX_TOKENS)
        if length >= MIN_PROMPT_TOKENS:
            prompts.append(list(row["input_ids"][:length]))
    return prompts


@torch.no_grad()
def decode_counts(drafting: Any, target: FrozenTarget, prompts: Sequence[list[int]], config: DecodingConfig,
                  eos_token_ids: set[int], seed: int) -> torch.Tensor:
    """[committed tokens, decoding steps, reached_1..D, accepted_1..D] summed over `prompts`, D the draft depth
    (float64, so the processes' counts can be summed with one reduce; `tau_counts_size(config)` long). A draft deeper
    than the drafter can make is refused, as in eval (distill/decoding.py: check_draft_depth)."""
    decoder = Decoder(target, drafting, config, eos_token_ids, group="train.tau")
    # sampling (train.tau.temperature > 0) draws from its own seeded generator, never from training's random state
    generator = torch.Generator(decoder.device).manual_seed(seed)
    depth = config.draft_depth
    counts = torch.zeros(tau_counts_size(config), dtype=torch.float64)
    for prompt in prompts:
        generation = decoder.generate(prompt, generator)
        counts[0] += sum(generation.accept_lengths)
        counts[1] += len(generation.accept_lengths)
        counts[2 : 2 + depth] += torch.tensor(generation.reached, dtype=torch.float64)
        counts[2 + depth :] += torch.tensor(generation.accepted, dtype=torch.float64)
    return counts


def tau_counts_size(config: DecodingConfig) -> int:
    return 2 + 2 * config.draft_depth


def tau_metrics(counts: torch.Tensor, config: DecodingConfig) -> dict[str, float]:
    """`val_tau` and `val_alpha_pos{k}` (k from 1, for the positions decoding reached) from summed `decode_counts`."""
    depth = config.draft_depth
    reached, accepted = counts[2 : 2 + depth], counts[2 + depth :]
    metrics = {"val_tau": float(counts[0] / counts[1].clamp(min=1))}
    metrics.update({f"val_alpha_pos{k + 1}": float(accepted[k] / reached[k]) for k in range(depth) if reached[k] > 0})
    return metrics
