"""The frozen-target wrapper: features at the requested layers, no gradients, clear errors for bad layer ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdistill.distill.errors import UserError
from specdistill.distill.target import FINAL_NORMED, FrozenTarget


TAPS = (0, 1, FINAL_NORMED)


def test_features_are_the_hidden_states_entering_each_layer(target):
    input_ids = torch.randint(0, 1000, (2, 9))
    output = target(input_ids, feature_layers=TAPS)
    # reference: transformers' hidden_states[i] is the input of layer i; the last output is after the final norm
    with torch.no_grad():
        reference = target.model(input_ids, output_hidden_states=True)
    assert torch.equal(output.features[0], reference.hidden_states[0])
    assert torch.equal(output.features[1], reference.hidden_states[1])
    assert torch.allclose(output.features[FINAL_NORMED], reference.hidden_states[-1])
    assert torch.allclose(output.logits, reference.logits)
    assert not any(p.requires_grad for p in target.parameters())


def test_training_features_can_feed_a_trainable_layer(target):
    features = target(torch.randint(0, 1000, (1, 5)), feature_layers=TAPS, for_training=True).features[FINAL_NORMED]
    layer = torch.nn.Linear(features.shape[-1], 3)
    layer(features).sum().backward()  # inference tensors would refuse to be saved for backward
    assert layer.weight.grad is not None


def test_layer_ids_out_of_range_name_the_key(toy_tiny_path):
    model = AutoModelForCausalLM.from_pretrained(toy_tiny_path)
    with pytest.raises(UserError, match=r"drafter.feature_layers: layer id 2 is out of range for a target with 2 layers"):
        FrozenTarget(model)(torch.zeros(1, 3, dtype=torch.long), feature_layers=(0, 2))


def test_two_drafters_tap_different_layers_of_one_target_in_any_order(target):
    """The taps are per call: a call for one drafter's layers never leaves hooks that change another's features."""
    input_ids = torch.randint(0, 1000, (1, 6))
    first = target(input_ids, feature_layers=(0, 1)).features
    only_final = target(input_ids, feature_layers=(FINAL_NORMED,)).features
    again = target(input_ids, feature_layers=(1, 0)).features
    assert set(only_final) == {FINAL_NORMED}
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(not hooks for hooks in (layer._forward_pre_hooks for layer in target.model.get_decoder().layers))


def test_the_cache_goes_by_the_keyword_the_forward_takes(target):
    """transformers renamed a forward's `past_key_values` to `cache` (5.40 removes the old name); passing `cache` to
    a forward without it would vanish into **kwargs and decode without the cache, so the name comes from the
    signature: the installed one, an older one, and a **kwargs-only forward (the installed Llama's name)."""
    import warnings

    from specdistill.distill.kv_cache import KVCache, cache_keyword

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class KwargsOnly(torch.nn.Module):
        def forward(self, *args, **kwargs): ...

    installed = cache_keyword(type(target.model))
    assert installed in ("cache", "past_key_values") and cache_keyword(type(target.model.get_decoder())) == installed
    assert cache_keyword(Before) == "past_key_values" and cache_keyword(KwargsOnly) == installed
    ids = torch.randint(0, 1000, (1, 7))
    cache = KVCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword on the way
        first = target(ids[:, :4], past_key_values=cache, position_ids=torch.arange(4)[None])
        second = target(ids[:, 4:], past_key_values=cache, position_ids=torch.arange(4, 7)[None])
    assert first.past_key_values is cache and cache.length == 7  # filled in place, handed back
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), target(ids).logits, atol=1e-5, rtol=1e-4)
