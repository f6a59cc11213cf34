"""The lean decoding forward (distill/lean.py) computes what transformers computes: logits and tapped features of
Llama-family models (llama, mistral, qwen2 with q/k/v biases, qwen3 with q/k norms and a wider head, Llama-3 RoPE
scaling) through prefill, a masked multi-row verify after a prefix and single-row steps; models it does not cover
are reported and decode through transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from specdistill.distill.kv_cache import KVCache
from specdistill.distill.target import FINAL_NORMED, FrozenTarget
from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters.token_lm import LMDrafting
from specdistill.distill.lean import Linear, lean_causal_lm, unsupported_reason
from specdistill.distill.masks import PrefixMask

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "llama3-rope": lambda: LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=32),
}
LAYERS = (0, 2, FINAL_NORMED)


def build(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="sdpa").eval()
    for module in model.modules():  # non-trivial norms and biases, so a dropped one would show
        for param_name, param in module.named_parameters(recurse=False):
            if "norm" in param_name or "bias" in param_name or "norm" in type(module).__name__.lower():
                param.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_forward_matches_transformers(name):
    model = build(name)
    assert unsupported_reason(model) is None
    target, lean = FrozenTarget(model), lean_causal_lm(model)
    hf_cache, lean_cache, masks = KVCache(), KVCache(), PrefixMask()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 30), generator=generator)
    block = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)  # a small tree
    steps = [
        (prompt, torch.arange(30)[None], None),
        (torch.tensor([[5, 7, 9, 11]]), torch.tensor([[30, 31, 31, 32]]), block),
        (torch.tensor([[3]]), torch.tensor([[32]]), None),
    ]
    with torch.inference_mode():
        for tokens, positions, block in steps:
            mask = None if block is None else masks(hf_cache.length, block)
            expected = target(tokens, attention_mask=mask, past_key_values=hf_cache, position_ids=positions,
                              feature_layers=LAYERS)
            actual = lean(tokens, positions, lean_cache, mask, LAYERS)
            torch.testing.assert_close(actual.logits, expected.logits, atol=2e-5, rtol=1e-4)
            for layer_id in LAYERS:
                torch.testing.assert_close(actual.features[layer_id], expected.features[layer_id], atol=2e-5, rtol=1e-4)
            assert lean_cache.length == hf_cache.length
        causal = torch.ones(2, 2, dtype=torch.bool).tril()
        last_only = lean(torch.tensor([[4, 6]]), torch.tensor([[33, 34]]), lean_cache, masks(lean_cache.length, causal),
                         last_logits_only=True)
        assert last_only.logits.shape == (1, 1, SHAPE["vocab_size"])


def test_linear_matches_f_linear_for_one_and_several_rows():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    for rows in (1, 5, 17):
        x = torch.randn(1, rows, 32)
        for with_bias in (None, bias):
            torch.testing.assert_close(Linear(weight, with_bias)(x), torch.nn.functional.linear(x, weight, with_bias),
                                       atol=1e-5, rtol=1e-5)


def test_models_it_does_not_cover_decode_through_transformers():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert "gpt2" in unsupported_reason(gpt2) and lean_causal_lm(gpt2) is None
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**SHAPE, sliding_window=16))
    assert "sliding" in unsupported_reason(windowed)
    decoder = Decoder(FrozenTarget(windowed), None, DecodingConfig(max_new_tokens=5))
    assert decoder.lean is None
    assert len(decoder.generate([1, 2, 3]).output_ids) == 5


@pytest.mark.parametrize("method", ["chain", "tree"])
def test_transformers_path_and_lean_path_decode_the_same_tokens(method):
    model = build("llama")
    config = DecodingConfig(method=method, gamma=3, tree_depth=3, tree_top_k=2, tree_total_tokens=6, max_new_tokens=24)
    target = FrozenTarget(model)
    prompt = list(range(3, 40))
    plain = Decoder(target, None, config).generate(prompt).output_ids
    via_transformers = Decoder(target, LMDrafting(build("qwen2"), "cpu", lean=False), config, lean=False)
    assert via_transformers.lean is None
    assert via_transformers.generate(prompt).output_ids == plain
