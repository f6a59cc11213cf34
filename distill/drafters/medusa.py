"""Medusa-1 (`drafter=medusa`), the baseline that shows what feature-level drafting buys: `num_heads` heads read h_t,
the target's final normed hidden state at position t, and head k predicts token t+2+k. Each head is
`num_residual_layers` residual blocks x ← x + SiLU(W x + b) and its own LM head (H → V, no bias). W and b start at
zero and the LM head as a copy of the target's, so every head starts as the target's LM head (Medusa zeroes only W
and leaves b at PyTorch's default; zeroing b too makes the start exact).

The heads never read drafted tokens: at draft depth d every candidate gets head d−1's distribution, so a chain is
heads 0..γ−1's argmaxes and the evaluator's EAGLE-2 tree becomes Medusa's tree of head-probability products. A
drafter with K heads drafts at most K tokens deep (`MedusaDrafting.max_depth`).

Loss (objective=medusa): Σ_k head_decay^k · soft CE(head k at t, softmax(target logits at t+1+k)) over the positions
t whose token t+2+k is under the loss mask (distill/drafters/feature.py's `trained_rows` alignment, shifted by k).

    specdistill train drafter=medusa data_dir=... optim.lr=1e-3      # Medusa's recipe: lr 1e-3, cosine, 1 epoch
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from specdistill.distill import objectives
from specdistill.distill.drafters.feature import (
    BuildContext,
    DraftLoss,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterOptions,
    draft_config_from_target,
    rows,
    trained_rows,
)
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.drafting import Drafting
from specdistill.distill.errors import UserError
from specdistill.distill.lean import Linear
from specdistill.distill.objectives import MedusaObjective
from specdistill.distill.target import FINAL_NORMED, TargetOutput


class MedusaConfig(FeatureDrafterConfig):
    model_type = "specdistill_medusa"
    num_heads: int = 5
    num_residual_layers: int = 1


@dataclass
class MedusaOptions(FeatureDrafterOptions):
    kind: str = "medusa"
    num_heads: int = 5  # head k predicts token t+2+k: the deepest draft is num_heads tokens
    num_residual_layers: int = 1  # residual blocks x + SiLU(W x + b) per head before its LM head
    feature_layers: Optional[list[int]] = field(default_factory=lambda: [FINAL_NORMED])  # h_t: the final normed state


def check_options(options: MedusaOptions) -> None:
    """Refuse options Medusa cannot honour, instead of silently ignoring them."""
    if options.num_heads < 1:
        raise UserError(f"drafter.num_heads={options.num_heads}: Medusa needs at least 1 head; "
                        "set drafter.num_heads ≥ 1")
    if options.num_residual_layers < 0:
        raise UserError(f"drafter.num_residual_layers={options.num_residual_layers}: set it to 0 or more")
    if list(options.feature_layers or [FINAL_NORMED]) != [FINAL_NORMED]:
        raise UserError(f"drafter.feature_layers={list(options.feature_layers)}: Medusa heads read the target's final "
                        "normed hidden state (their LM heads start as the target's); leave drafter.feature_layers=[-1]")
    if options.num_layers != 1:
        raise UserError(f"drafter.num_layers={options.num_layers}: Medusa heads have no decoder layers; set "
                        "drafter.num_residual_layers (residual blocks per head) instead")


class ZeroInitLinear(nn.Linear):
    """An nn.Linear that `MedusaDrafter._init_weights` starts at zero (W and b)."""


class MedusaResidualBlock(nn.Module):
    """x + SiLU(W x + b); zero W and b make it the identity (the head starts as its LM head)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = ZeroInitLinear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, config: MedusaConfig):
        super().__init__()
        blocks = [MedusaResidualBlock(config.hidden_size) for _ in range(config.num_residual_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.lm_head(hidden)


class MedusaDrafter(FeatureDrafter):
    config_class = MedusaConfig
    Options = MedusaOptions
    Objectives = {"medusa": MedusaObjective}

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        self.heads = nn.ModuleList([MedusaHead(config) for _ in range(config.num_heads)])
        self.post_init()

    @classmethod
    def check_objective(cls, objective: MedusaObjective) -> None:
        if not (math.isfinite(objective.head_decay) and objective.head_decay > 0):
            raise UserError(f"objective.head_decay={objective.head_decay}: must be a number > 0 "
                            "(head k's loss is weighted head_decay**k; Medusa's is 0.8)")

    @classmethod
    def build(cls, options: MedusaOptions, context: BuildContext) -> "MedusaDrafter":
        check_options(options)
        target = context.target
        config = draft_config_from_target(cls.config_class, target.config, [FINAL_NORMED], num_hidden_layers=0,
                                          num_heads=options.num_heads,
                                          num_residual_layers=options.num_residual_layers,
                                          **cls.stop_head_field(options))
        drafter = cls(config)
        drafter.record_target(context)
        drafter.attach_target(target)
        with torch.no_grad():  # Medusa copies the target's LM head into every head
            for head in drafter.heads:
                head.lm_head.weight.copy_(target.lm_head.weight)
        return drafter

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroInitLinear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def identity(self) -> dict:
        return {**super().identity(), "num_heads": self.config.num_heads,
                "num_residual_layers": self.config.num_residual_layers}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Every head's logits at every position of `features` (h_t, [batch, T, H]) → [batch, T, num_heads, V]."""
        return torch.stack([head(features) for head in self.heads], dim=2)

    def training_draft_logits(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor],
                              committed: int) -> torch.Tensor:
        """feature.py's protocol: the heads never read drafted tokens, so row j is head j at the last position the
        target ran (committed − 1)."""
        depth = input_ids.shape[1] - committed
        return self(features[FINAL_NORMED][:, committed - 1 : committed])[0, 0, :depth]

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        objective: MedusaObjective,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        """Σ_k head_decay^k · Σ_rows soft CE of head k (module doc); only the trained rows reach the LM heads."""
        features = target.features[FINAL_NORMED]
        weights = objectives.decay_weights(len(self.heads), objective.head_decay)
        loss_sum, agree, counted = features.new_zeros((), dtype=torch.float32), [], []
        for k, (head, weight) in enumerate(zip(self.heads, weights)):
            selected = trained_rows(loss_mask, k)  # t where token t+2+k is trained
            draft_logits = head(rows(features, 0, selected))
            target_logits = rows(target.logits, 1 + k, selected)  # the target's distribution of token t+2+k
            loss_sum = loss_sum + weight * objectives.soft_cross_entropy(draft_logits, target_logits).sum()
            # float32 counts: exact far beyond bfloat16's 256
            agree.append(objectives.top1_agreement(draft_logits, target_logits).sum().float().detach())
            counted.append(selected.sum().float())
        return DraftLoss(loss_sum, counted[0], torch.stack(agree), torch.stack(counted))

    @property
    def max_depth(self) -> int:
        """Head k drafts token k + 1 of a step and no head reads drafted tokens, so it drafts at most num_heads deep."""
        return self.config.num_heads

    def drafting(self, device: torch.device | str) -> "MedusaDrafting":
        return MedusaDrafting(self, device)


class LeanMedusaHead:
    """One head's decoding forward on distill/lean.py's fast ops (weights copied: build it after loading)."""

    def __init__(self, head: MedusaHead):
        self.blocks = [Linear(block.linear.weight, block.linear.bias) for block in head.blocks]
        self.lm_head = Linear(head.lm_head.weight)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = hidden + F.silu(block(hidden))
        return self.lm_head(hidden)


class MedusaDrafting(Drafting):
    """Drafting with Medusa heads: `begin`/`extend` keep h_t of the last position the target ran (token t+1, the
    target's own choice, is committed, so head k predicts token t+2+k) and return head 0's logits; `step` at depth d
    returns head d's, the same row for every fed token. No cache, so there is nothing to roll back: each `extend`
    replaces h. Head d runs only when depth d is drafted (a chain of γ < num_heads skips the deeper LM heads)."""

    feature_layers = (FINAL_NORMED,)

    def __init__(self, drafter: MedusaDrafter, device: torch.device | str):
        super().__init__(device)
        with torch.no_grad():
            self.heads = [LeanMedusaHead(head) for head in drafter.heads]
        self.max_depth = drafter.max_depth
        self.hidden: torch.Tensor | None = None  # [1, H]: h of the last position the target ran

    def begin(self, prompt_ids, features, first_token):
        self.length = 0
        return self._read(features)

    def extend(self, tokens, features):
        return self._read(features)

    def _read(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Keep the last row of the positions the target just ran → head 0's logits [V]."""
        hidden = features[FINAL_NORMED][0]
        self.length += hidden.shape[0]
        self.hidden = hidden[-1:]
        return self.heads[0](self.hidden)[0]

    def step(self, tokens, parents, depth, block):
        return self.heads[depth](self.hidden).expand(len(tokens), -1)


register_kind("medusa", MedusaDrafter)
