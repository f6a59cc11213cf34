"""The maths of the objectives, checked against direct computations on small tensors."""

from __future__ import annotations

import math

import torch

from specdistill.distill import objectives


def test_feature_regression_is_smooth_l1_per_position():
    predicted = torch.tensor([[[0.0, 0.0], [0.5, 3.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    # |d| < 1: d²/2; |d| ≥ 1: |d| − 1/2; mean over the hidden dimension
    expected = torch.tensor([[0.0, (0.125 + 2.5) / 2]])
    assert torch.allclose(objectives.feature_regression(predicted, target), expected)


def test_soft_cross_entropy_is_entropy_plus_kl():
    torch.manual_seed(0)
    target_logits, draft_logits = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(objectives.soft_cross_entropy(draft_logits, target_logits), entropy + kl, atol=1e-5)
    # minimised (= entropy) when the drafter matches the target
    assert torch.allclose(objectives.soft_cross_entropy(target_logits, target_logits), entropy, atol=1e-5)


def test_draft_vocab_restriction_and_argmax_mask():
    target_logits = torch.tensor([[[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.0]]])
    draft_to_target = torch.tensor([1, 2])
    restricted, argmax_in_vocab = objectives.restrict_to_draft_vocab(target_logits, draft_to_target)
    assert torch.equal(restricted, torch.tensor([[[5.0, 1.0], [0.0, 1.0]]]))
    assert argmax_in_vocab.tolist() == [[True, False]]  # position 1's argmax (id 0) is outside the draft vocab
    given = objectives.restrict_to_draft_vocab(target_logits, draft_to_target, target_logits.argmax(-1))
    assert torch.equal(given[0], restricted) and torch.equal(given[1], argmax_in_vocab)
    whole, everywhere = objectives.restrict_to_draft_vocab(target_logits, torch.arange(4))
    assert torch.equal(whole, target_logits) and everywhere.all()


def test_cross_entropy_with_probs_is_soft_cross_entropy():
    torch.manual_seed(0)
    target_logits, draft_logits = torch.randn(5, 9), torch.randn(5, 9)
    assert torch.allclose(objectives.cross_entropy_with_probs(draft_logits, target_logits.softmax(-1)),
                          objectives.soft_cross_entropy(draft_logits, target_logits))


def test_top_k_cross_entropy_equals_full_when_k_is_the_vocab():
    torch.manual_seed(1)
    target_logits, draft_logits = torch.randn(4, 6), torch.randn(4, 6)
    full = objectives.soft_cross_entropy(draft_logits, target_logits)
    assert torch.allclose(objectives.top_k_cross_entropy(draft_logits, target_logits, k=6), full, atol=1e-6)
    assert (objectives.top_k_cross_entropy(draft_logits, target_logits, k=2) < full).all()


def test_top1_agreement_noise_and_decay():
    draft, target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 2.0], [0.0, 2.0]]])
    assert objectives.top1_agreement(draft, target).tolist() == [[1.0, 0.0]]
    features = torch.zeros(1000)
    noisy = objectives.uniform_noise(features, 0.1, torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.1 and noisy.std() > 0.05  # U(−a, a) has std a/√3 ≈ 0.058
    assert objectives.uniform_noise(features, 0.0) is features
    assert objectives.decay_weights(3, 0.8) == [1.0, 0.8, 0.8**2] and math.isclose(sum(objectives.decay_weights(2, 1.0)), 2)


def test_expected_accept_length_is_the_chain_formula():
    # constant agreement a over γ drafts: τ = (1 − a^{γ+1}) / (1 − a)  (Leviathan et al.)
    assert math.isclose(objectives.expected_accept_length([0.8], num_drafts=5), (1 - 0.8**6) / (1 - 0.8))
    assert objectives.expected_accept_length([1.0, 0.5, 0.0], num_drafts=1) == 1 + 1.0 + 0.5 + 0.0
    assert objectives.expected_accept_length([0.0]) == 1.0
