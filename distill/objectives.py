"""Training objectives as pure tensor functions.

Per-position functions return a `[batch, seq]` tensor of losses, so the recipe can normalise by the number of
masked tokens across a whole accumulated batch. Conventions: `mask` is 1 where
a position is trained on; logits are `[batch, seq, vocab]`; features are `[batch, seq, hidden]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

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


# ---------------------------------------------------------------------------------------------------------------
# Token-level divergences (DistillSpec / GKD). p is the target's distribution, q the drafter's, both at the same
# temperature; each returns a per-position [batch, seq] tensor (or [rows]).


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.float() / temperature).log_softmax(dim=-1)


def forward_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q): mode-covering; 0 iff p = q."""
    log_p, log_q = _log_probs(target_logits, temperature), _log_probs(draft_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def reverse_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(q ‖ p) = Σ_v q (log q − log p): mode-seeking."""
    log_p, log_q = _log_probs(target_logits, temperature), _log_probs(draft_logits, temperature)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def generalized_jsd(draft_logits: torch.Tensor, target_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q: symmetric at β = 0.5, ≤ log 2 there;
    it tends to forward KL's gradient as β → 0 and reverse KL's as β → 1 (scaled by β, 1 − β)."""
    log_p, log_q = _log_probs(target_logits, temperature), _log_probs(draft_logits, temperature)
    if beta <= 0 or beta >= 1:
        raise ValueError(f"objective.beta={beta}: the generalised JSD needs 0 < β < 1 (use fkl / rkl for the limits)")
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return beta * kl_p + (1 - beta) * kl_q


def total_variation(draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TVD(p, q) = ½ Σ_v |p − q| = 1 − Σ_v min(p, q). 1 − TVD is the probability that speculative sampling accepts
    the drafted token (Leviathan et al.), so minimising TVD maximises per-token acceptance directly."""
    p, q = _log_probs(target_logits, temperature).exp(), _log_probs(draft_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(dim=-1)


def hard_label_cross_entropy(draft_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log q(label): plain next-token cross-entropy on the data's tokens (the baseline without the target)."""
    return F.cross_entropy(draft_logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


# ---------------------------------------------------------------------------------------------------------------
# Schemas of the `objective=` group (conf/objective/<name>.yaml). A drafter kind names the ones it trains with
# (`Objectives`), so `objective=fkl` with `drafter=eagle1` fails at start instead of being silently ignored.


@dataclass
class Objective:
    def for_validation(self) -> "Objective":
        """The objective validation reads (no augmentation)."""
        return self


@dataclass
class FeatureObjective(Objective):
    """Feature-level heads (EAGLE-1, FSPAD, EAGLE-3): the names users set are the names the losses read."""

    feature_weight: float = 1.0  # SmoothL1 feature regression (EAGLE-1 / FSPAD; EAGLE-3 has no feature loss)
    token_weight: float = 0.1  # soft cross-entropy against the target's distribution
    noise: float = 0.1  # U(−noise, noise) added to the input features
    ttt_steps: int = 1  # unrolled training-time-test steps (EAGLE-3's 7); gradients flow through the steps
    ttt_decay: float = 0.8  # weight of step s is ttt_decay**s

    @property
    def unrolled_steps(self) -> int:
        return self.ttt_steps

    def step_weights(self) -> list[float]:
        return decay_weights(self.ttt_steps, self.ttt_decay)

    @property
    def detach_steps(self) -> bool:
        """Whether a step's input features are cut from the graph of the step that produced them."""
        return False

    @property
    def top_k_weight(self) -> float:
        return 0.0

    @property
    def top_k(self) -> int:
        return 0

    def for_validation(self) -> "FeatureObjective":
        return replace(self, noise=0.0)


@dataclass
class HassObjective(FeatureObjective):
    """HASS: harmonized context alignment over `alignment_passes` passes (pass j's queries read the drafter's own
    features of pass j − 1 for the j − 1 most recent positions, older positions the target's; the features handed
    between passes are detached; each pass's loss counts fully) plus the top-K distillation loss. Unrolled exactly
    like EAGLE-3's training-time test (distill/drafters/feature.py says why the two are the same computation), so
    `ttt_steps`/`ttt_decay` must stay at 1 / 1.0 here."""

    alignment_passes: int = 3
    top_k_loss_weight: float = 0.0  # w of w · L_topK (stage A of the recipe: 0; stage B: 1)
    top_k_size: int = 10  # K
    ttt_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.ttt_steps != 1 or self.ttt_decay != 1.0:
            raise ValueError("objective=hass unrolls objective.alignment_passes passes of equal weight; leave "
                             "objective.ttt_steps / ttt_decay (EAGLE-3's names) unset")
        if self.alignment_passes < 1:
            raise ValueError(f"objective.alignment_passes={self.alignment_passes}: at least 1 pass")

    @property
    def unrolled_steps(self) -> int:
        return self.alignment_passes

    def step_weights(self) -> list[float]:
        return [1.0] * self.alignment_passes

    @property
    def detach_steps(self) -> bool:
        return True

    @property
    def top_k_weight(self) -> float:
        return self.top_k_loss_weight

    @property
    def top_k(self) -> int:
        return self.top_k_size


class Divergence(Enum):
    fkl = "fkl"  # forward KL(p ‖ q)
    rkl = "rkl"  # reverse KL(q ‖ p)
    jsd = "jsd"  # generalised JSD(β)
    tvd = "tvd"  # total variation; 1 − TVD is the per-token acceptance probability
    ce = "ce"  # hard-label cross-entropy on the data's tokens (no target distribution)


class DataSource(Enum):
    fixed = "fixed"  # the prepared dataset as it is (fixed or target-regenerated responses: prep decides)
    on_policy = "on_policy"  # the drafter samples the responses, the target scores them in the same step


@dataclass
class TokenObjective(Objective):
    """Token-level drafters (DistillSpec / GKD)."""

    divergence: Divergence = Divergence.fkl
    beta: float = 0.5  # JSD(β)
    temperature: float = 1.0  # both distributions are softened by it before the divergence
    data_source: DataSource = DataSource.fixed
    on_policy_fraction: float = 0.5  # λ: share of micro-batches whose responses the drafter samples (on_policy)
    on_policy_tokens: int = 64  # tokens the drafter samples per response
    on_policy_temperature: float = 1.0  # the drafter's sampling temperature for on-policy responses

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"objective.temperature={self.temperature}: must be > 0")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"objective.on_policy_fraction={self.on_policy_fraction}: must lie in [0, 1]")

    def per_position(self, draft_logits: torch.Tensor, target_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """The chosen divergence per position."""
        if self.divergence is Divergence.ce:
            return hard_label_cross_entropy(draft_logits, labels)
        if self.divergence is Divergence.jsd:
            return generalized_jsd(draft_logits, target_logits, self.beta, self.temperature)
        divergence = {Divergence.fkl: forward_kl, Divergence.rkl: reverse_kl, Divergence.tvd: total_variation}
        return divergence[self.divergence](draft_logits, target_logits, self.temperature)


@dataclass
class MedusaObjective(Objective):
    """Medusa: soft cross-entropy per head against the target's distribution, head k weighted head_decay**k."""

    head_decay: float = 0.8

