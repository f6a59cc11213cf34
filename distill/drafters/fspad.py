"""FSPAD (`drafter=fspad`): EAGLE-1 plus feature sampling and partial alignment distillation (REFERENCE.md).

    feature sampling       h0 = fc([e_{t+1}; f_t]);  h = h0 + down(SiLU(gate(e_{t+1})) ⊙ up(RMSNorm(h0)))
                           (the token embedding gates the fused feature in the intermediate width)
    partial alignment      the last layer's MLP writes 2H onto [h ‖ h]: the first half goes through the target's frozen
                           LM head (soft CE, objective.token_weight), the second half is regressed to f_{t+1}
                           (SmoothL1, objective.feature_weight) and is what drafting feeds back

`drafter.feature_sampling=false` / `drafter.partial_alignment=false` switch either off; with both off FSPAD is
EAGLE-1 exactly (a test checks it), so the ablation is one override.

    specdistill train drafter=fspad data_dir=...
    specdistill train drafter=fspad drafter.feature_sampling=false data_dir=...     # ablation
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdistill.distill.drafters.eagle1 import Eagle1Drafter, Eagle1Head, Eagle1Options
from specdistill.distill.drafters.engine_layouts import EngineLayout, ExportUnsupported
from specdistill.distill.drafters.feature import FeatureDrafterConfig
from specdistill.distill.drafters.modules import MLP, DraftDecoderLayer, RMSNorm
from specdistill.distill.drafters.registry import register_kind
from specdistill.distill.lean import Linear, rms_norm


class FspadConfig(FeatureDrafterConfig):
    model_type = "specdistill_fspad"
    feature_sampling: bool = True
    partial_alignment: bool = True


@dataclass
class FspadOptions(Eagle1Options):
    kind: str = "fspad"
    feature_sampling: bool = True  # the token embedding gates the fused feature
    partial_alignment: bool = True  # separate LM-head and fed-back halves of the last layer's output


def split_halves(output: torch.Tensor, partial_alignment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM-head input, fed-back feature): the two halves of a 2H output, or the output twice without the split."""
    if not partial_alignment:
        return output, output
    token_part, feature_part = output.chunk(2, dim=-1)
    return token_part, feature_part


class FeatureSampler(nn.Module):
    """h0 + down(SiLU(gate(e)) ⊙ up(RMSNorm(h0))), with the module names of a Llama MLP (gate/up/down_proj)."""

    def __init__(self, config: FspadConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        return hidden + mlp.down_proj(F.silu(mlp.gate_proj(embeds)) * mlp.up_proj(self.norm(hidden)))


def fspad_parts_on(config: dict) -> list[str]:
    """FSPAD's parts a drafter's config switches on (none: EAGLE-1 exactly)."""
    return [name for name in ("feature_sampling", "partial_alignment") if config.get(name)]


class FspadDrafter(Eagle1Drafter):
    config_class = FspadConfig
    Options = FspadOptions

    def __init__(self, config: FspadConfig):
        super().__init__(config)
        self.sampler = FeatureSampler(config) if config.feature_sampling else None
        self.post_init()

    @classmethod
    def formats_for(cls, config: dict) -> tuple[str, ...]:
        """No serving engine runs FSPAD's feature sampling or its split output; with both off it is EAGLE-1 exactly
        and exports as one."""
        return () if fspad_parts_on(config) else cls.export_formats

    def engine_layout(self, format: str, gamma: int) -> EngineLayout:
        if switched_on := fspad_parts_on(self.config.to_dict()):
            raise ExportUnsupported(f"format={format}: no serving engine runs FSPAD's {' and '.join(switched_on)}; "
                                    "export format=hf (our own folder), or train with both switched off (= EAGLE-1)")
        return super().engine_layout(format, gamma)

    @classmethod
    def config_overrides(cls, options: FspadOptions) -> dict:
        return {"feature_sampling": options.feature_sampling, "partial_alignment": options.partial_alignment}

    def make_layer(self, index: int) -> DraftDecoderLayer:
        last = index == self.config.num_hidden_layers - 1
        copies = 2 if last and self.config.partial_alignment else 1
        return DraftDecoderLayer(self.config, input_norm=index > 0, output_copies=copies)

    def mix_token(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return hidden if self.sampler is None else self.sampler(hidden, embeds)

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_halves(output, self.config.partial_alignment)

    def head(self) -> "FspadHead":
        return FspadHead(self)


class FspadHead(Eagle1Head):
    """FSPAD's decoding forward: EAGLE-1's, with the feature sampler after fc and the output split in halves."""

    def __init__(self, drafter: FspadDrafter):
        super().__init__(drafter)
        self.partial_alignment = drafter.config.partial_alignment
        sampler = drafter.sampler
        self.sampler = None
        if sampler is not None:
            with torch.no_grad():
                mlp = sampler.mlp
                self.sampler = (sampler.norm.weight.detach(), Linear(mlp.gate_proj.weight), Linear(mlp.up_proj.weight),
                                Linear(mlp.down_proj.weight))

    def mix_token(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if self.sampler is None:
            return hidden
        norm, gate, up, down = self.sampler
        return hidden + down(F.silu(gate(embeds)) * up(rms_norm(hidden, norm, self.eps)))

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_halves(output, self.partial_alignment)


register_kind("fspad", FspadDrafter)
