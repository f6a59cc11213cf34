"""Drafter kinds, one module each (eagle1.py, eagle3.py, ...); `registry` is how the rest of specdistill finds them.
Importing this package registers every kind with transformers' Auto classes and Hydra's ConfigStore."""

from specdistill.distill.drafters.registry import (
    DrafterKind,
    discover_kinds,
    drafter_kind,
    feature_layers_every_kind_reads,
    kind_of_folder,
    kind_of_model_type,
    load_drafting,
    register_kind,
    registered_kinds,
    resolve_objective,
)

discover_kinds()

__all__ = [
    "DrafterKind",
    "discover_kinds",
    "drafter_kind",
    "feature_layers_every_kind_reads",
    "kind_of_folder",
    "kind_of_model_type",
    "load_drafting",
    "register_kind",
    "registered_kinds",
    "resolve_objective",
]
