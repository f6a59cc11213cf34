"""transformers' own decoding (eval/baselines.py) returns exactly our plain greedy decoding's tokens on the tiny toy
target: plain `generate`, assisted generation with the target as its own assistant, and prompt lookup."""

from __future__ import annotations

import pytest

from specdistill.eval.baselines import hf_generate
from specdistill.distill.decoding import Decoder, DecodingConfig

METHODS = {
    "plain": {},
    "assisted": {"num_assistant_tokens": 4},  # assistant_model: the target itself, set in the test
    "prompt_lookup": {"prompt_lookup_num_tokens": 4},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_decoding_equals_our_plain_greedy_decoding(tiny, method):
    ours = Decoder(tiny.target, None, DecodingConfig(max_new_tokens=20))
    assistant = tiny.model if method == "assisted" else None
    for prompt in tiny.prompts[:3]:
        expected = ours.generate(prompt).output_ids
        tokens, _ = hf_generate(tiny.model, prompt, 20, set(), assistant_model=assistant, **METHODS[method])
        assert tokens == expected


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_decoding_stops_at_eos_like_ours(tiny, method):
    """EOS ids: a token the plain output makes at its 8th position (the tiny target rarely ends a turn itself)."""
    assistant = tiny.model if method == "assisted" else None
    for prompt in tiny.prompts[:3]:
        unstopped = Decoder(tiny.target, None, DecodingConfig(max_new_tokens=20)).generate(prompt).output_ids
        eos = {unstopped[7]}
        expected = Decoder(tiny.target, None, DecodingConfig(max_new_tokens=20), eos).generate(prompt).output_ids
        assert len(expected) <= 8 and expected[-1] in eos
        tokens, _ = hf_generate(tiny.model, prompt, 20, eos, assistant_model=assistant, **METHODS[method])
        assert tokens == expected
