"""A drafter kind defined outside specdistill, to show that a kind is one module plus one config file: a head that
starts as a copy of the target's last decoder layer, reads the input of that layer, and mixes in the next token's
embedding through `fc` (EAGLE-1's alignment, loss and decoding forward, reused). Nothing in train/ or eval/ names it:
they find it through the registry once this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specdistill.distill.drafters import register_kind
from specdistill.distill.drafters.eagle1 import Eagle1Drafter
from specdistill.distill.drafters.feature import BuildContext, FeatureDrafterConfig, FeatureDrafterOptions, draft_config_from_target
from specdistill.distill.drafters.modules import DraftDecoderLayer


class CopyLastConfig(FeatureDrafterConfig):
    model_type = "specdistill_copy_last"  # specdistill_<registered name>


@dataclass
class CopyLastOptions(FeatureDrafterOptions):
    kind: str = "copy_last"


class CopyLastDrafter(Eagle1Drafter):
    config_class = CopyLastConfig
    Options = CopyLastOptions

    def __init__(self, config: CopyLastConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([DraftDecoderLayer(config, input_norm=True)])  # a full Llama layer, as copied
        self.post_init()

    @classmethod
    def default_feature_layers(cls, num_layers: int) -> tuple[int, ...]:
        return (num_layers - 1,)  # the input of the target's last layer, which the head starts as a copy of

    @classmethod
    def build(cls, options: CopyLastOptions, context: BuildContext) -> "CopyLastDrafter":
        target = context.target
        [last] = cls.default_feature_layers(target.num_layers)
        drafter = cls(draft_config_from_target(CopyLastConfig, target.config, [last], num_hidden_layers=1))
        drafter.layers[0].load_state_dict(target.model.get_decoder().layers[last].state_dict())
        with torch.no_grad():  # fc starts as "pass the feature through": [embed; f] → f
            hidden = target.config.hidden_size
            drafter.fc.weight.zero_()
            drafter.fc.weight[:, hidden:] = torch.eye(hidden)
            drafter.fc.bias.zero_()
        drafter.record_target(context)
        drafter.attach_target(target)
        return drafter


register_kind("copy_last", CopyLastDrafter)
