"""P-EAGLE (`drafter=peagle`, arXiv 2602.01469): EAGLE-3's drafter that drafts a whole round in one forward.

Layout, the same in training and decoding. The depth-0 entry of position i is EAGLE-3's pair (t_{i+1}, g_i) at RoPE
position i; it predicts t_{i+2}. The depth-d entry of anchor i (d = 1..K−1) is (mask token, combine(mask_hidden)) at
RoPE position i + d, where `mask_hidden` is a learned vector in the taps' space that stands in for the target features
nobody has yet, and `combine` is EAGLE-3's fc (with its norms); it predicts t_{i+2+d}. An entry attends to the depth-0
entries of positions ≤ its anchor and to its own chain (the depth 1..d entries of the same anchor).

Decoding: once the target ran positions ..n−1 and chose t_n, one forward over the newly committed pairs followed by
K−1 mask entries of anchor n−1 is plain causal attention over the drafter's cache, and its last K rows are the round's
drafts (`Drafting.parallel`). The mask entries are dropped before the next round, like any draft.

Training (COD, "conditional-on-distribution" sampling): every position's depth-0 entry, and at depth d a random subset
of the depth-(d−1) anchors, a fraction max(r^d, r_min) of the trained positions, nested so that every kept entry has
its whole chain as in decoding. The loss is EAGLE-3's soft cross-entropy over the draft vocabulary at every entry,
depth d weighted by 1 / (K · its kept fraction), so each depth counts equally (speculators' per-depth mean).

Mask token (feature.py's `choose_mask_token`): `drafter.mask_token_id`, else the tokenizer's own mask token, else the
id the training data uses least; recorded in config.json as `mask_token_id`, which vLLM reads.

    specdistill train drafter=peagle objective=peagle data_dir=...       # experiment=peagle: the paper's knobs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from specdistill.distill.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, Eagle3Options
from specdistill.distill.drafters.engine_layouts import EngineLayout, ExportUnsupported, ascending_taps
from specdistill.distill.drafters.feature import (
    BuildContext,
    DraftLoss,
    choose_mask_token,
    rows,
    shift_left,
    trained_rows,
)
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.drafting import FeatureDrafting, ParallelRounds
from specdistill.distill.errors import UserError
from specdistill.distill.masks import additive_bias
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.target import TargetOutput


class PEagleConfig(Eagle3Config):
    model_type = "specdistill_peagle"
    parallel_depths: int = 8  # K: the depths one forward drafts (and training trained)
    mask_token_id: int = 0  # the token the depth ≥ 1 entries feed (vLLM reads `mask_token_id`)


@dataclass
class PEagleOptions(Eagle3Options):
    kind: str = "peagle"
    num_layers: int = 4  # P-EAGLE's draft layers (the paper's default; EAGLE-3 has 1)
    parallel_depths: int = 8  # K: tokens drafted per forward; decoding drafts at most this deep
    mask_token_id: Optional[int] = None  # None: the tokenizer's mask token, else the training data's least used id


@dataclass
class PEagleObjective(FeatureObjective):
    """P-EAGLE's loss: EAGLE-3's soft cross-entropy at every COD-sampled entry (module doc). It has no training-time
    test (the depths are drafted in parallel), so `ttt_steps` stays 1 and `feature_weight` 0."""

    feature_weight: float = 0.0
    token_weight: float = 1.0
    noise: float = 0.0
    cod_ratio: float = 0.7  # r: depth d keeps r^d of the trained positions
    cod_ratio_min: float = 0.2  # … but never fewer than this fraction


def cod_anchors(candidates: torch.Tensor, depths: int, ratio: float, ratio_min: float,
                generator: torch.Generator | None) -> list[torch.Tensor]:
    """The anchors of depths 1..depths−1 (module doc): depth d keeps max(ratio^d, ratio_min) of the `candidates`
    ([T] bool) positions, drawn from depth d−1's so that the sets are nested; each sorted ascending."""
    previous = candidates.nonzero().flatten()
    total, anchors = len(previous), []
    for depth in range(1, depths):
        keep = min(len(previous), round(total * max(ratio**depth, ratio_min)))
        order = torch.randperm(len(previous), generator=generator, device=previous.device)
        previous = previous[order[:keep]].sort().values
        anchors.append(previous)
    return anchors


class PEagleDrafter(Eagle3Drafter):
    config_class = PEagleConfig
    Options = PEagleOptions
    Objectives = {"peagle": PEagleObjective}
    supports_stop_head = False  # one forward drafts every depth

    def __init__(self, config: PEagleConfig):
        super().__init__(config)
        taps_width = len(config.feature_layers) * config.target_hidden_size
        # vLLM's layout: [1, taps width], projected through combine (fc and its norms) like real taps
        self.mask_hidden = nn.Parameter(torch.randn(1, taps_width))

    @classmethod
    def config_fields(cls, options: PEagleOptions, context: BuildContext) -> dict:
        if options.parallel_depths < 1:
            raise UserError(f"drafter.parallel_depths={options.parallel_depths} is out of range: it must be an "
                            "integer ≥ 1 (the tokens one forward drafts; the paper trains 8)")
        vocab_size = context.target.config.vocab_size
        return {"parallel_depths": options.parallel_depths,
                "mask_token_id": choose_mask_token(options.mask_token_id, context, vocab_size)}

    @classmethod
    def check_objective(cls, objective: PEagleObjective) -> None:
        super().check_objective(objective)
        if objective.ttt_steps != 1:
            raise UserError(f"objective.ttt_steps={objective.ttt_steps}: P-EAGLE drafts every depth in one forward, so "
                            "it has no training-time test; leave it at 1 (objective=peagle)")
        if not 0 < objective.cod_ratio < 1 or not 0 <= objective.cod_ratio_min <= 1:
            raise UserError(f"objective.cod_ratio={objective.cod_ratio}, objective.cod_ratio_min="
                            f"{objective.cod_ratio_min}: the ratio must lie in (0, 1) and its floor in [0, 1]")

    @property
    def max_depth(self) -> int:
        """Depths past the trained ones would read mask entries it never learned to read."""
        return self.config.parallel_depths

    def identity(self) -> dict:
        return {**super().identity(), "parallel_depths": self.config.parallel_depths,
                "mask_token_id": self.config.mask_token_id}

    # ---- training ----

    def parallel_forward(self, tokens: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor,
                         anchors: list[torch.Tensor]) -> torch.Tensor:
        """The layout of the module doc over a batch: `tokens` [B, T] and `hidden` [B, T, H] are the depth-0 entries'
        (t_{i+1}, g_i); anchors[d − 1] lists depth d's anchors (the same for every row; a row whose anchor is padding
        just has no loss there) → output rows [B, T + Σ anchors, H], depth-0 entries first, then depth by depth."""
        batch, length = tokens.shape
        device = tokens.device
        anchor_of = torch.cat([torch.arange(length, device=device), *anchors])
        depth_of = torch.cat([torch.zeros(length, dtype=torch.long, device=device),
                              *[torch.full_like(chosen, depth) for depth, chosen in enumerate(anchors, start=1)]])
        masks = len(anchor_of) - length
        fed = torch.cat([tokens, tokens.new_full((batch, masks), self.config.mask_token_id)], dim=1)
        mask_feature = self.combine(self.mask_hidden.to(hidden.dtype))
        hidden = torch.cat([hidden, mask_feature.expand(batch, masks, -1)], dim=1)
        query_anchor, query_depth = anchor_of[:, None], depth_of[:, None]
        visible = (((depth_of == 0) & (anchor_of <= query_anchor))
                   | ((anchor_of == query_anchor) & (depth_of >= 1) & (depth_of <= query_depth)))
        visible = visible[None] & attention_mask.bool()[:, anchor_of][:, None, :]  # no padded key
        positions = (anchor_of + depth_of)[None].expand(batch, -1)
        return self.step(fed, hidden, positions, additive_bias(visible, hidden.dtype)[:, None])

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetOutput,
        objective: PEagleObjective,
        generator: torch.Generator | None = None,
    ) -> DraftLoss:
        length, depths = input_ids.shape[1], self.config.parallel_depths
        hidden = self.fuse(self.noisy_taps(target, objective, generator))
        side = self.target_side(target)
        selected = trained_rows(loss_mask)  # depth 0: position i predicts token i + 2
        candidates = selected.any(dim=0)
        anchors = cod_anchors(candidates, depths, objective.cod_ratio, objective.cod_ratio_min, generator)
        out = self.parallel_forward(shift_left(input_ids, 1), hidden, attention_mask, anchors)
        per_row, agreeing = self.token_loss(self.logits(rows(out, 0, selected)), side, lambda x: rows(x, 1, selected),
                                            objective)
        trained = max(int(candidates.sum()), 1)
        loss_sum = per_row.sum() / depths
        agree, counted = [agreeing.sum().float()], [selected.sum().float()]
        start = length
        for depth, chosen in enumerate(anchors, start=1):
            entries = out[:, start : start + len(chosen)]
            start += len(chosen)
            predicted = chosen + 2 + depth  # the token the entry predicts; the target's distribution sits one before
            in_sequence = predicted < length
            entry_selected = in_sequence & loss_mask[:, predicted.clamp(max=length - 1)].bool()
            source = (predicted - 1).clamp(max=length - 1)
            per_row, agreeing = self.token_loss(self.logits(entries[entry_selected]), side,
                                                lambda x: x[:, source][entry_selected], objective)
            kept = max(len(chosen), 1) / trained
            loss_sum = loss_sum + per_row.sum() / (depths * kept)
            agree.append(agreeing.sum().float())
            counted.append(entry_selected.sum().float())
        return DraftLoss(loss_sum, counted[0], torch.stack(agree).detach(), torch.stack(counted))

    def training_draft_logits(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor],
                              committed: int) -> torch.Tensor:
        """feature.py's protocol through the training layout: depth-0 entries for the committed positions, and the
        chain of anchor committed − 1 for the drafted depths (which never read the drafted tokens)."""
        drafted = input_ids.shape[1] - committed
        hidden = self.hidden_input(features)[:, :committed]
        anchor = torch.tensor([committed - 1], device=input_ids.device)
        out = self.parallel_forward(input_ids[:, 1 : committed + 1], hidden, torch.ones_like(input_ids[:, :committed]),
                                    [anchor] * (drafted - 1))
        return self.vocab_logits(out[0, committed - 1 :])

    # ---- decoding ----

    def drafting(self, device: torch.device | str) -> "PEagleDrafting":
        return PEagleDrafting(PEagleHead(self), device, self.config.mask_token_id, self.config.parallel_depths)

    # ---- serving engines' layouts ----

    export_formats = ("vllm", "speculators")
    speculative_methods = {"vllm": "eagle3"}
    speculative_settings = {"vllm": {"parallel_drafting": True}}  # vLLM serves P-EAGLE as EAGLE-3 drafting in parallel

    def engine_layout(self, format: str, gamma: int) -> EngineLayout:
        """EAGLE-3's layout plus `mask_hidden` (its columns in the ascending tap order fc's take) and the mask token:
        `mask_token_id` (vLLM format) or the speculators `peagle` type, which vLLM maps to parallel EAGLE-3."""
        where = f"format={format}"
        if format not in self.export_formats:
            raise ExportUnsupported(f"{where}: a P-EAGLE drafter exports to {', '.join(self.export_formats)} or hf")
        if format == "speculators" and self.config.fc_norm:
            raise ExportUnsupported(f"{where}: vLLM's speculators `peagle` reader does not read fc_norm, so it would "
                                    "serve another model than the one trained; export with format=vllm")
        layout = super().engine_layout(format, gamma)
        config = self.config
        _, _, columns = ascending_taps(list(config.feature_layers), config.target_hidden_size, where)
        layout.tensors["mask_hidden"] = layout.tensors["mask_hidden"][:, columns].contiguous()
        fields = {"mask_token_id": config.mask_token_id, "parallel_depths": config.parallel_depths}
        if format == "speculators":
            fields.update(architectures=["PEagleSpeculator"], speculators_model_type="peagle")
            speculators_config = dict(layout.config["speculators_config"], algorithm="peagle")
            layout.config.update(speculators_config=speculators_config)
        layout.config.update(fields)
        return layout


class PEagleHead(Eagle3Head):
    """EAGLE-3's decoding forward plus the mask entries' feature, combine(mask_hidden), computed once."""

    def __init__(self, drafter: PEagleDrafter):
        super().__init__(drafter)
        with torch.no_grad():
            self.mask_feature = self.combine(drafter.mask_hidden.detach())[None]  # [1, 1, H]


class PEagleDrafting(ParallelRounds, FeatureDrafting):
    """`begin`/`extend` commit the new pairs and append draft_depth − 1 mask entries in the same causal forward; its
    last draft_depth rows are the round's drafts, which `step` reads by depth."""

    def __init__(self, head: PEagleHead, device: torch.device | str, mask_token_id: int, parallel_depths: int):
        super().__init__(head, device)
        self.mask_token_id = mask_token_id
        self.max_depth = self.draft_depth = parallel_depths

    def extend(self, tokens, features):
        self.kv_cache.truncate(self.length)  # drop the previous round's mask entries
        count, masks = tokens.shape[1], self.draft_depth - 1
        hidden = self.head.decode_input(features)
        fed = torch.cat([tokens, tokens.new_full((1, masks), self.mask_token_id)], dim=1)
        hidden = torch.cat([hidden, self.head.mask_feature.to(hidden.dtype).expand(1, masks, -1)], dim=1)
        out = self.head.hidden_states(fed, hidden, self._positions(count + masks), self.kv_cache,
                                      self._commit_mask(count + masks))
        self.length += count
        self.round_logits = self.head.read_out(out[0, count - 1 :])
        return self.round_logits[0]


register_kind("peagle", PEagleDrafter)
