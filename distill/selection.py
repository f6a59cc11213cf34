"""Online drafter selection (HedgeSpec, Liu et al., arXiv 2510.20064): several drafters, one of them drafts each step.

`HedgeDrafting` is a `Drafting` made of member drafters. Every member commits every step's accepted tokens, so each
one always holds the next-token distribution q_i of the committed prefix; the leader also drafts. After the target
has verified a step, every member is scored on the step's first position from what that forward already computed:

    acceptance_i = Σ_x min(p(x), q_i(x))     (T > 0: the chance that a draft x ~ q_i is accepted, 1 − TV(p, q_i))
    acceptance_i = [argmax q_i = argmax p]   (greedy: whether its draft would have been accepted)
    loss_i = 1 − acceptance_i

with p the target's distribution there (temperature and top-p applied to both, as in verification). Exponential
weights w_i ∝ exp(−η Σ loss_i) over the prompt's steps so far; the leader, who drafts the next step, is the drafter
of largest weight, i.e. of least cumulative loss for any η > 0, so no η needs choosing. Each prompt starts from a
prior worth `prior_steps` steps of the stream so far (every drafter's mean loss per step over the earlier prompts ×
prior_steps; 0: afresh, as the paper competes with the best drafter of each query), then adds its own steps' losses:
a one-step score is noisy (greedy: 0 or 1), and without the prior a lucky step hands a prompt to a weaker drafter,
while a prompt on which another drafter is truly better overtakes the prior within about prior_steps steps.

Where this differs from the paper: HedgeSpec scores every verified token of the chunk; here each step scores one
position, the chunk's first, because only there does every drafter kind hold a prediction (Medusa, DFlash and
P-EAGLE predict from the last committed position only). It needs no target pass beyond the step's own.

Lossless: the leader of a step is fixed by earlier steps only, before its drafts are drawn, and verification is exact
for whichever drafter drafted, so the output keeps the target's distribution (greedy: equals plain decoding).
Cost: every member's catch-up forward runs each step (`calls_per_commit`), the price of always holding every q_i.
"""

from __future__ import annotations

import torch

from specdistill.distill import verification
from specdistill.distill.drafting import Drafting


def acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float, top_p: float) -> float:
    """The chance that the drafter's draft at one position is accepted (module doc): [V] logits each → [0, 1]."""
    if temperature <= 0:
        return float(draft_logits.argmax() == target_logits.argmax())
    p = verification.target_probs(target_logits, temperature, top_p)
    q = verification.target_probs(draft_logits, temperature, top_p)
    return float(torch.minimum(p, q).sum())


class HedgeDrafting(Drafting):
    """Drafting by the current leader of `members` (name → Drafting), every member kept in step (module doc).

    `lead_steps[name]`: decoding steps that name drafted; `acceptance_sum[name]`, `scored_steps`: its summed
    acceptance over the scored steps, across all prompts (the report's per-drafter numbers)."""

    def __init__(self, members: dict[str, Drafting], device: torch.device | str, prior_steps: float = 0.0):
        super().__init__(device)
        self.prior_steps = prior_steps
        if len(members) < 2:
            raise ValueError("online selection needs at least two drafters")
        self.members = members
        self.names = list(members)
        self.feature_layers = tuple(dict.fromkeys(layer for member in members.values()
                                                  for layer in member.feature_layers))
        depths = [member.max_depth for member in members.values() if member.max_depth is not None]
        self.max_depth = min(depths) if depths else None
        self.calls_per_commit = len(members)
        self.lead_steps = dict.fromkeys(self.names, 0)
        self.acceptance_sum = dict.fromkeys(self.names, 0.0)
        self.scored_steps = 0
        self.stream_acceptance = dict.fromkeys(self.names, 0.0)  # every prompt so far: the next prompt's prior
        self.stream_steps = 0
        self.prompt_losses = dict.fromkeys(self.names, 0.0)
        self.leader = self.names[0]
        self.next_logits: dict[str, torch.Tensor] = {}

    @property
    def parallel(self) -> bool:  # the leader's: it alone drafts
        return self.members[self.leader].parallel

    @property
    def draft_depth(self) -> int:
        return self.members[self.leader].draft_depth

    @draft_depth.setter
    def draft_depth(self, depth: int) -> None:
        for member in self.members.values():
            member.draft_depth = depth

    def begin(self, prompt_ids, features, first_token):
        self.next_logits = {name: member.begin(prompt_ids, features, first_token)
                            for name, member in self.members.items()}
        # a new prompt: the stream's prior (module doc); its first leader the best over earlier prompts
        steps = max(self.stream_steps, 1)
        self.prompt_losses = {name: self.prior_steps * (1.0 - self.stream_acceptance[name] / steps) if self.stream_steps
                              else 0.0 for name in self.names}
        self.leader = max(self.names, key=lambda name: self.stream_acceptance[name])  # first listed on a tie
        return self.next_logits[self.leader]

    def observe(self, target_logits: torch.Tensor, temperature: float, top_p: float) -> None:
        """Score every member's prediction of the step's first position against the target's (module doc)."""
        self.lead_steps[self.leader] += 1
        self.scored_steps += 1
        self.stream_steps += 1
        for name, logits in self.next_logits.items():
            score = acceptance(target_logits, logits, temperature, top_p)
            self.acceptance_sum[name] += score
            self.stream_acceptance[name] += score
            self.prompt_losses[name] += 1.0 - score

    def extend(self, tokens, features):
        self.next_logits = {name: member.extend(tokens, features) for name, member in self.members.items()}
        self.leader = min(self.names, key=lambda name: self.prompt_losses[name])  # the first listed on a tie
        return self.next_logits[self.leader]

    def step(self, tokens, parents, depth, block):
        return self.members[self.leader].step(tokens, parents, depth, block)

    def reset_statistics(self) -> None:
        """Forget the report's counts so far (after a warm-up); the next prompt's first leader still comes from
        every prompt decoded."""
        self.lead_steps = dict.fromkeys(self.names, 0)
        self.acceptance_sum = dict.fromkeys(self.names, 0.0)
        self.scored_steps = 0

    def summary(self) -> dict:
        """For the report: per member, the share of decoding steps it drafted and its mean first-position acceptance."""
        steps = max(sum(self.lead_steps.values()), 1)
        return {name: {"lead_fraction": self.lead_steps[name] / steps,
                       "first_position_acceptance": self.acceptance_sum[name] / max(self.scored_steps, 1)}
                for name in self.names}
