"""Training objectives as pure tensor functions.

Per-position functions return a `[batch, seq]` tensor of losses, so the recipe can normalise by the number of
masked tokens across a whole accumulated batch. Conventions: `mask` is 1 where
a position is trained on; logits are `[batch, seq, vocab]`; features are `[batch, seq, hidden]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def feature_regression(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EAGLE's feature loss: SmoothL1 (β = 1) per position, averaged over the hidden dimension."""
    return F.smooth_l1_loss(predicted.float(), target.float(), reduction="none", beta=1.0).mean(dim=-1)


def soft_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """−Σ_v p_target(v) · log q_draft(v) per position (the target distribution is a constant)."""
    return cross_entropy_with_probs(draft_logits, target_logits.float().softmax(dim=-1))


def cross_entropy_with_probs(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """`soft_cross_entropy` with the target's distribution given as probabilities (computed once, reused)."""
    return -(target_probs * draft_logits.float().log_softmax(dim=-1)).sum(dim=-1)


def restrict_to_draft_vocab(
    target_logits: torch.Tensor, draft_to_target: torch.Tensor, target_argmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's reduced vocabulary: the target's logits at the draft-vocabulary ids (a distribution over the draft
    vocabulary once softmaxed), and a `[batch, seq]` mask that is 1 where the target's argmax lies inside it
    (positions whose best token the drafter cannot propose are not trained on). `target_argmax`: that argmax, when
    the caller already has it."""
    if len(draft_to_target) == target_logits.shape[-1]:  # the whole vocabulary (the ids are sorted and unique)
        return target_logits, torch.ones(target_logits.shape[:-1], dtype=torch.bool, device=target_logits.device)
    in_vocab = torch.zeros(target_logits.shape[-1], dtype=torch.bool, device=target_logits.device)
    in_vocab[draft_to_target] = True
    argmax_in_vocab = in_vocab[target_logits.argmax(dim=-1) if target_argmax is None else target_argmax]
    return target_logits[..., draft_to_target], argmax_in_vocab


def top_k_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """HASS's top-K distillation: −Σ_{v ∈ TopK(p_target)} p_target(v) · log q_draft(v) per position."""
    target_probs = target_logits.float().softmax(dim=-1)
    top_probs, top_ids = target_probs.topk(k, dim=-1)
    draft_log_probs = draft_logits.float().log_softmax(dim=-1).gather(-1, top_ids)
    return -(top_probs * draft_log_probs).sum(dim=-1)


def top1_agreement(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where the drafter's argmax equals the target's (the greedy acceptance proxy), per position."""
    return (draft_logits.argmax(dim=-1) == target_logits.argmax(dim=-1)).float()


def uniform_noise(features: torch.Tensor, amplitude: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """EAGLE's input-feature augmentation: features + U(−amplitude, amplitude), elementwise."""
    if amplitude == 0:
        return features
    noise = torch.rand(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + (noise * 2 - 1) * amplitude


def decay_weights(num_steps: int, decay: float) -> list[float]:
    """Weights decay**s of the unrolled training-time-test steps s = 0..num_steps-1 (EAGLE-3: 0.8)."""
    return [decay**step for step in range(num_steps)]


def expected_accept_length(agreement_per_step: list[float], num_drafts: int = 5) -> float:
    """τ-proxy for greedy chain drafting: τ = 1 + Σ_{k=1}^{γ} Π_{j<k} a_j, where a_j is the top-1 agreement at draft
    step j (later steps reuse the last measured one) and γ = max(num_drafts, steps measured)."""
    steps = max(num_drafts, len(agreement_per_step))
    tau, reach = 1.0, 1.0
    for step in range(steps):
        reach *= agreement_per_step[min(step, len(agreement_per_step) - 1)]
        tau += reach
    return tau


@dataclass
class ObjectiveConfig:
    """The loss knobs of a drafter's `training_loss`; also the Hydra schema of the `objective=` group
    (conf/objective/<name>.yaml), so the names users set are the names the losses read."""

    feature_weight: float = 1.0  # SmoothL1 feature regression (EAGLE-1)
    token_weight: float = 0.1  # soft cross-entropy against the target's distribution
    noise: float = 0.1  # U(−noise, noise) added to the input features
    ttt_steps: int = 1  # unrolled training-time-test steps (EAGLE-3)
    ttt_decay: float = 0.8  # weight of step s is ttt_decay**s
