"""HASS: harmonized context alignment is the unrolled training-time test with detached hand-overs, checked against an
explicit per-query reference; its top-K loss; objective=hass through the recipe."""

from __future__ import annotations

import pytest
import torch

from specdistill.distill import objectives
from specdistill.distill.drafters.modules import causal_bias
from specdistill.distill.objectives import HassObjective
from tests.conftest import random_drafter as build

PASSES = 3


def sharp(drafter):
    """The drafter with queries and keys scaled up: at the default init (std 0.02) attention is nearly uniform, and
    a wrong position or a wrong key would change outputs by less than any tolerance."""
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(25.0)
    return drafter


def explicit_pass_outputs(drafter, input_ids: torch.Tensor, hidden0: torch.Tensor) -> dict:
    """HASS as the paper states it, one query at a time: pass j (= step j − 1) at query position p reads the sequence
    x_0..x_p where x_k = (t_{k+1}, h_k) with h_k the target-fed input for positions older than the j − 1 most recent,
    and for the m-th most recent of those the drafter's own fed-back output of pass j − m − … (recursively, from
    this reference itself); run through the plain causal forward, its last row is the pass's output at p.
    → {(step, row i = p − step): (LM-head input, fed-back feature)}."""
    length = input_ids.shape[1]
    outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(PASSES):
        for row in range(length - 1 - step):
            # rows ≤ i: the target's features; positions i + m (m = 1..step): pass m's input there, i.e. the fed-back
            # output of pass m − 1 at row i (its prediction of the feature at position i + m)
            states = [hidden0[0, k] for k in range(row + 1)] + [outputs[(m - 1, row)][1] for m in range(1, step + 1)]
            tokens = input_ids[:, 1 : row + step + 2]
            positions = torch.arange(row + step + 1)[None]
            bias = causal_bias(torch.ones_like(tokens), hidden0.dtype)
            token_part, fed_back = drafter.unroll_step(tokens, torch.stack(states)[None], positions, bias, None)
            outputs[(step, row)] = token_part[0, -1], fed_back[0, -1]
    return outputs


@pytest.mark.parametrize("kind", ["eagle1", "fspad", "eagle3"])
def test_each_pass_reads_the_previous_passes_features_exactly_where_hass_says(tiny, kind):
    drafter = sharp(build(kind, tiny.target))
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden0 = drafter.hidden_input(tiny.target(input_ids, feature_layers=drafter.feature_layers).features)
        bias = causal_bias(torch.ones_like(input_ids), hidden0.dtype)
        unrolled = list(drafter.unrolled_outputs(input_ids, hidden0, bias, PASSES, detach=True))
        reference = explicit_pass_outputs(drafter, input_ids, hidden0)
    for (step, row), (token_part, fed_back) in reference.items():
        torch.testing.assert_close(unrolled[step][0][0, row], token_part, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unrolled[step][1][0, row], fed_back, atol=1e-5, rtol=1e-5)
    # the reference is not trivially equal to a plain causal pass: pass 2 differs from pass 1 on the same rows
    assert not torch.allclose(unrolled[1][1][0, :5], unrolled[0][1][0, :5], atol=1e-3)


def test_features_handed_between_passes_are_detached_and_eagle3_ttt_is_not(tiny):
    drafter = build("eagle1", tiny.target)
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    hidden0 = drafter.hidden_input(tiny.target(input_ids, feature_layers=drafter.feature_layers,
                                               for_training=True).features)
    bias = causal_bias(torch.ones_like(input_ids), hidden0.dtype)
    for detach, reaches in ((True, False), (False, True)):
        first, second = list(drafter.unrolled_outputs(input_ids, hidden0, bias, 2, detach=detach))
        gradient = torch.autograd.grad(second[1].sum(), first[1], allow_unused=True)[0]
        assert (gradient is not None) == reaches


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_hass_loss_is_the_sum_of_equal_passes_with_top_k_and_trains_only_the_drafter(tiny, kind):
    drafter = build(kind, tiny.target).train()
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    attention_mask, loss_mask = torch.ones_like(input_ids), torch.ones_like(input_ids)
    loss_mask[:, :3] = 0
    output = tiny.target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    weights = dict(feature_weight=0.0, token_weight=1.0) if kind == "eagle3" else {}
    plain = HassObjective(noise=0.0, **weights)
    with_top_k = HassObjective(noise=0.0, top_k_loss_weight=1.0, **weights)
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, with_top_k)
    base = drafter.training_loss(input_ids, attention_mask, loss_mask, output, plain)
    assert loss.agree.shape == (PASSES,) and loss.loss_sum > base.loss_sum  # the top-K term adds a positive loss
    (loss.loss_sum / loss.num_tokens).backward()
    assert all(p.grad is not None for p in drafter.parameters() if p.requires_grad)
    assert not any(p.requires_grad or p.grad is not None for p in tiny.target.parameters())


def test_top_k_loss_ignores_target_mass_outside_the_top_k():
    torch.manual_seed(0)
    draft_logits, target_logits = torch.randn(3, 20), torch.randn(3, 20)
    probs = target_logits.softmax(-1)
    top_ids = probs.topk(4, dim=-1).indices
    inside = torch.zeros_like(probs).scatter(-1, top_ids, 1.0)
    expected = -(probs * inside * draft_logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(objectives.top_k_cross_entropy(draft_logits, target_logits, k=4), expected)
    # moving the drafter's mass around among tokens outside the target's top K (same log-normaliser) changes nothing
    shuffled = draft_logits.clone()
    outside = (inside == 0)
    for row in range(3):
        values = shuffled[row][outside[row]]
        shuffled[row][outside[row]] = values.flip(0)
    torch.testing.assert_close(objectives.top_k_cross_entropy(shuffled, target_logits, k=4), expected)


def test_hass_objective_refuses_eagle3_names_and_eagle3_refuses_a_feature_loss():
    from specdistill.distill.drafters import drafter_kind, resolve_objective
    from specdistill.distill.errors import UserError

    with pytest.raises(ValueError, match="alignment_passes"):
        HassObjective(ttt_steps=3)
    with pytest.raises(UserError, match="objective.feature_weight"):
        resolve_objective(drafter_kind("eagle3"), HassObjective())


def test_init_from_loads_a_same_shaped_drafter_and_refuses_another(tiny, tmp_path):
    from specdistill.distill.errors import UserError

    stage_a = build("eagle1", tiny.target)
    stage_a.save_pretrained(tmp_path / "a", safe_serialization=True)
    stage_b = build("eagle1", tiny.target)
    with torch.no_grad():
        for parameter in stage_b.parameters():
            parameter.add_(1.0)
    stage_b.load_initial_weights(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(stage_a.state_dict().values(), stage_b.state_dict().values()))
    with pytest.raises(UserError, match="init_from: .* another drafter"):
        build("fspad", tiny.target).load_initial_weights(tmp_path / "a")
    with pytest.raises(UserError, match="init_from"):
        build("eagle1", tiny.target).load_initial_weights(tmp_path / "missing")
