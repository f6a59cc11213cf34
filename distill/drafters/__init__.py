"""Drafter models; importing this package registers their configs and models with transformers' Auto classes."""

from specdistill.distill.drafters.eagle import (
    DraftLoss,
    Eagle1Config,
    Eagle1Drafter,
    Eagle3Config,
    Eagle3Drafter,
    ObjectiveWeights,
    build_eagle_drafter,
    check_drafter_matches_target,
    default_eagle3_layers,
    draft_config_from_target,
    select_draft_vocab,
    trained_rows,
)

__all__ = [
    "DraftLoss",
    "Eagle1Config",
    "Eagle1Drafter",
    "Eagle3Config",
    "Eagle3Drafter",
    "ObjectiveWeights",
    "build_eagle_drafter",
    "default_eagle3_layers",
    "check_drafter_matches_target",
    "draft_config_from_target",
    "select_draft_vocab",
    "trained_rows",
]
