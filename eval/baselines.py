"""transformers' own decoding on our prompts, for comparison beside distill/decoding.py: plain greedy `generate`,
assisted generation with a draft model (`assistant_model=`), and prompt lookup (`prompt_lookup_num_tokens=`).

transformers v5 notes (generation/utils.py, generation/candidate_generator.py):
- the assistant's own `generation_config` drives drafting: `num_assistant_tokens` (γ) and
  `num_assistant_tokens_schedule` ("constant" keeps γ fixed; the library default adapts it between calls);
- `assistant_confidence_threshold` defaults to 0.4 when unset, and a `ConfidenceCriteria` then stops drafting early
  whenever the draft's top probability falls below it; we set it to 0 so every round drafts exactly γ tokens, as ours;
- `eos_token_id=None` passed to `generate` overrides the model's own EOS ids (no stopping on EOS).
"""

from __future__ import annotations

import time

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: set[int],
    assistant_model: nn.Module | None = None,
    prompt_lookup_num_tokens: int | None = None,
    num_assistant_tokens: int | None = None,
) -> tuple[list[int], float]:
    """Greedy `model.generate` of `prompt_ids` (batch 1), optionally assisted by `assistant_model` drafting
    `num_assistant_tokens` tokens a round, or by prompt lookup of `prompt_lookup_num_tokens` tokens.
    → (the new token ids only, wall seconds around `generate`, synchronised on CUDA)."""
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise ValueError("pass assistant_model or prompt_lookup_num_tokens, not both")
    device = next(model.parameters()).device
    eos = sorted(eos_token_ids)
    pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    kwargs: dict = {}
    if assistant_model is not None:
        config = assistant_model.generation_config
        if num_assistant_tokens is not None:
            config.num_assistant_tokens = num_assistant_tokens
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0  # else drafting stops early below 0.4 confidence (see above)
        kwargs["assistant_model"] = assistant_model
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    input_ids = torch.tensor([prompt_ids], device=device)
    _sync(device)
    started = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos or None,
        **kwargs,
    )
    _sync(device)
    seconds = time.perf_counter() - started
    return output[0, len(prompt_ids):].tolist(), seconds
