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

Cost: a member's catch-up forward (`extend`) is the price of holding its q_i. With `score_every` = k > 1 (the paper's
"skipping update") the members that do not lead hold the accepted tokens back and commit k steps' worth in one
forward every k-th step, so they are scored on every k-th step only; the leader always commits at once, and a member
that becomes leader catches up first. The leader is then the least *mean* loss per scored step (prior included:
(prior_steps · stream mean + the prompt's summed losses) ÷ (prior_steps + the prompt's scored steps)), which is the
least cumulative loss when every member is scored every step (k = 1).
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

    `lead_steps[name]`: decoding steps that name drafted since `reset_statistics`; `stream_acceptance[name]`,
    `stream_scored[name]`: its summed acceptance and its scored steps over every prompt (the next prompt's prior; the
    report's numbers are their growth since `reset_statistics`)."""

    def __init__(self, members: dict[str, Drafting], device: torch.device | str, prior_steps: float = 0.0,
                 score_every: int = 1):
        super().__init__(device)
        self.prior_steps, self.score_every = prior_steps, score_every
        if len(members) < 2:
            raise ValueError("online selection needs at least two drafters")
        self.members = members
        self.names = list(members)
        self.feature_layers = tuple(dict.fromkeys(layer for member in members.values()
                                                  for layer in member.feature_layers))
        depths = [member.max_depth for member in members.values() if member.max_depth is not None]
        self.max_depth = min(depths) if depths else None
        self.calls_per_commit = len(members)  # member forwards of the last begin/extend
        self.stream_acceptance = dict.fromkeys(self.names, 0.0)
        self.stream_scored = dict.fromkeys(self.names, 0)
        self.reset_statistics()
        self.prompt_losses = dict.fromkeys(self.names, 0.0)
        self.prompt_scored = dict.fromkeys(self.names, 0)
        self.prior = {name: (0.0, 0.0) for name in self.names}
        self.leader = self.names[0]
        self.next_logits: dict[str, torch.Tensor] = {}  # the members holding the committed prefix's q: the fresh ones
        self.pending: dict[str, list[tuple[torch.Tensor, dict[int, torch.Tensor]]]] = {name: [] for name in self.names}
        self.commits = 0  # extends in this prompt

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
        self.calls_per_commit = len(self.members)
        self.pending = {name: [] for name in self.names}
        self.commits = 0
        self.prompt_losses = dict.fromkeys(self.names, 0.0)  # a new prompt: its own losses on the stream's prior
        self.prompt_scored = dict.fromkeys(self.names, 0)
        self.prior = {name: (self.prior_steps if self.stream_scored[name] else 0.0, self._stream_mean_loss(name))
                      for name in self.names}  # (weight in steps, mean loss), fixed for the prompt
        self.leader = min(self.names, key=self._stream_mean_loss)  # the best so far (first listed on a tie)
        return self.next_logits[self.leader]

    def _stream_mean_loss(self, name: str) -> float:
        scored = self.stream_scored[name]
        return 1.0 - self.stream_acceptance[name] / scored if scored else 0.0

    def _mean_loss(self, name: str) -> float:
        """The prompt's mean loss per scored step with the stream's prior worth prior_steps steps (module doc)."""
        prior_weight, prior_loss = self.prior[name]
        weight = prior_weight + self.prompt_scored[name]
        return (prior_weight * prior_loss + self.prompt_losses[name]) / weight if weight else 0.0

    def observe(self, target_logits: torch.Tensor, temperature: float, top_p: float) -> None:
        """Score every fresh member's prediction of the step's first position against the target's (module doc)."""
        self.lead_steps[self.leader] += 1
        for name, logits in self.next_logits.items():
            score = acceptance(target_logits, logits, temperature, top_p)
            self.stream_acceptance[name] += score
            self.stream_scored[name] += 1
            self.prompt_losses[name] += 1.0 - score
            self.prompt_scored[name] += 1

    def extend(self, tokens, features):
        self.commits += 1
        for name in self.names:
            self.pending[name].append((tokens, features))
        catch_up = self.names if self.commits % self.score_every == 0 else [self.leader]
        self.next_logits = {}
        self.calls_per_commit = 0
        for name in catch_up:
            self._catch_up(name)
        self.leader = min(self.names, key=self._mean_loss)  # the first listed on a tie
        if self.leader not in self.next_logits:  # a new leader holding tokens back commits them first
            self._catch_up(self.leader)
        return self.next_logits[self.leader]

    def _catch_up(self, name: str) -> None:
        """Commit the tokens `name` held back, in one forward → its q of the next position (now fresh)."""
        held = self.pending[name]
        tokens = torch.cat([tokens for tokens, _ in held], dim=1)
        features = {layer: torch.cat([step_features[layer] for _, step_features in held], dim=1)
                    for layer in held[0][1]}
        self.next_logits[name] = self.members[name].extend(tokens, features)
        self.pending[name] = []
        self.calls_per_commit += 1

    def step(self, tokens, parents, depth, block):
        return self.members[self.leader].step(tokens, parents, depth, block)

    def reset_statistics(self) -> None:
        """Start the report's counts here (after a warm-up); the next prompt's prior still comes from every prompt
        decoded."""
        self.lead_steps = dict.fromkeys(self.names, 0)
        self.counted_from = (dict(self.stream_acceptance), dict(self.stream_scored))

    def summary(self) -> dict:
        """For the report: per member, the share of decoding steps it drafted and its mean first-position acceptance,
        since `reset_statistics`."""
        steps = max(sum(self.lead_steps.values()), 1)
        acceptance_before, scored_before = self.counted_from
        return {name: {"lead_fraction": self.lead_steps[name] / steps,
                       "first_position_acceptance": (self.stream_acceptance[name] - acceptance_before[name])
                       / max(self.stream_scored[name] - scored_before[name], 1)}
                for name in self.names}
