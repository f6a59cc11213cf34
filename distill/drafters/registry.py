"""The one place train/, eval/ and export look a drafter kind up.

A kind is one module in distill/drafters/ (or in another installed package, see below) that defines its model class
(`Options` dataclass, `Objectives` (the objective schemas it trains with, the first its default), `build`,
`check_target`, `load_initial_weights`, `prepare_batch`, `training_loss`, `trained_rows`, `identity`,
`save_pretrained` and `drafting` — the protocol of `feature.FeatureDrafter`) and ends with

    register_kind("<name>", ModelClass)

which makes `drafter=<name>` a config choice (conf/drafter/<name>.yaml starts from the `<name>_schema` this stores
in Hydra's ConfigStore, so a misspelled key fails at start), lets `AutoModel.from_pretrained` reload its folders,
and lets the evaluator find it by the `model_type` in a drafter folder's config.json (a kind that saves a plain
Hugging Face causal LM, `token_lm`, has no `config_class` of its own and loads as one). Kinds in other packages are
found through the `specdistill.drafters` entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel

from specdistill.distill.drafters.engine_layouts import check_tensor_shapes, shapes_of
from specdistill.distill.errors import UserError
from specdistill.distill.target import FrozenTarget


@dataclass(frozen=True)
class DrafterKind:
    name: str  # drafter=<name>
    model_class: type  # the drafter's PreTrainedModel subclass

    @property
    def model_type(self) -> str | None:
        """The `model_type` of the folders it saves; None when they are plain causal LMs."""
        config_class = getattr(self.model_class, "config_class", None)
        return None if config_class is None else config_class.model_type

    @property
    def options(self) -> type:
        return self.model_class.Options


_KINDS: dict[str, DrafterKind] = {}


def register_kind(name: str, model_class: type) -> DrafterKind:
    """Register a drafter kind (module doc). Registering the same class again is a no-op."""
    kind = DrafterKind(name, model_class)
    if _KINDS.get(name, kind) != kind:
        raise ValueError(f"drafter kind {name!r} is already registered by {_KINDS[name].model_class.__name__}")
    _KINDS[name] = kind
    if kind.model_type is not None:
        AutoConfig.register(kind.model_type, model_class.config_class, exist_ok=True)
        AutoModel.register(model_class.config_class, model_class, exist_ok=True)
    try:  # Hydra is for training; the copy of this file `export format=hf` bundles loads without it
        from hydra.core.config_store import ConfigStore
    except ImportError:
        return kind
    ConfigStore.instance().store(group="schema/drafter", name=name, node=kind.options)
    return kind


_DISCOVERED = False


def discover_kinds() -> None:
    """Import every kind module of this package and of installed plugins (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("specdistill.distill.drafters")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    for entry_point in entry_points(group="specdistill.drafters"):
        importlib.import_module(entry_point.value)


def drafter_kind(name: str) -> DrafterKind:
    """The kind `drafter=<name>` (or `drafter.kind`) names."""
    discover_kinds()
    if name not in _KINDS:
        raise UserError(f"drafter.kind: unknown drafter kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def kind_of_model_type(model_type: str | None) -> DrafterKind | None:
    """The registered kind whose saved config.json has this `model_type`, or None (e.g. a plain causal LM)."""
    discover_kinds()
    return next((kind for kind in _KINDS.values() if model_type is not None and kind.model_type == model_type), None)


def registered_kinds() -> list[DrafterKind]:
    discover_kinds()
    return list(_KINDS.values())


def resolve_objective(kind: DrafterKind, objective: Any) -> Any:
    """The `objective` config as the kind's objective dataclass: the kind's default when None; a clear error when it
    is a schema the kind does not train with (e.g. objective=fkl with drafter=eagle1) or a value is invalid."""
    try:  # in a `try`, which transformers' import check skips: `export format=hf` bundles this file
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as error:
        raise UserError(f"objective: resolving an objective needs omegaconf ({error}); install specdistill") from None

    accepted = kind.model_class.Objectives
    names = ", ".join(schema.__name__ for schema in accepted)
    if objective is None:
        return accepted[0]()
    try:
        value = OmegaConf.to_object(objective) if OmegaConf.is_config(objective) else objective
    except (ValueError, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error, OmegaConfBaseException) and error.__cause__ else error
        raise UserError(f"objective: {' '.join(str(cause).split())}") from None
    if not isinstance(value, accepted):
        found = type(value).__name__ if not isinstance(value, dict) else "a config without a schema"
        raise UserError(f"objective: drafter={kind.name} trains with {names}, not {found}; pick an objective= made for "
                        f"it (conf/objective/), or leave objective unset for its default")
    kind.model_class.check_objective(value)
    return value


def kind_of_engine_architecture(architecture: str) -> DrafterKind | None:
    """The kind that imports serving-engine checkpoints of this `architectures` entry (its `engine_architectures`)."""
    discover_kinds()
    return next((kind for kind in _KINDS.values()
                 if architecture in vars(kind.model_class).get("engine_architectures", ())), None)


def read_json_file(path: Path, key: str, missing: str, damaged: str) -> dict:
    """A JSON object file, with one clear message (naming the config key `key`) for each way it can be unusable:
    `missing` says what to pass instead, `damaged` what to do about a damaged folder."""
    if not path.is_file():
        raise UserError(f"{key}: {path.parent} has no {path.name}; {missing}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: {path} is not valid JSON ({error}); the folder is damaged, {damaged}") from None
    if not isinstance(value, dict):
        raise UserError(f"{key}: {path} does not hold a JSON object; the folder is damaged, {damaged}")
    return value


def read_drafter_config(path: Path) -> dict:
    """config.json of a drafter folder, with one clear message for each way it can be unusable."""
    what_to_pass = ("pass the `drafter` folder that `specdistill train` wrote (<out_dir>/drafter) or a Hugging Face "
                    "causal LM folder")
    if not path.is_dir():
        raise UserError(f"drafter_path: {path} is not a folder; {what_to_pass}")
    config = read_json_file(path / "config.json", "drafter_path", what_to_pass, "save or train the drafter again")
    if not config.get("model_type"):
        raise UserError(f"drafter_path: {path / 'config.json'} has no model_type, so its drafter kind is unknown; "
                        f"known kinds: {', '.join(kind.model_type for kind in registered_kinds() if kind.model_type)} "
                        "or any Hugging Face causal LM")
    return config


def load_weights_checked(model_class: type, path: Path, **kwargs: Any) -> Any:
    """`from_pretrained` (safetensors only) with one clear message for a missing or damaged weights file."""
    weights = path / "model.safetensors"
    if not weights.is_file() and not (path / "model.safetensors.index.json").is_file():
        raise UserError(f"drafter_path: {path} has no model.safetensors; the drafter was not saved completely "
                        "(train it again, or point at a complete drafter folder)")
    check_weight_shapes(model_class, path)
    try:
        return model_class.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"drafter_path: cannot load the weights in {path} ({first_line}); the file is damaged or "
                        "truncated: train or copy the drafter again") from None


def check_weight_shapes(model_class: type, path: Path) -> None:
    """Every tensor in model.safetensors has the shape config.json gives it (and none is missing): one message naming
    the first that differs, rather than transformers' report or, worse, a silently re-initialised weight."""
    from safetensors import safe_open

    weights = path / "model.safetensors"
    if not weights.is_file() or not hasattr(model_class, "config_class"):  # sharded, or an Auto class: transformers
        return                                                               # checks those itself
    config = model_class.config_class.from_pretrained(path)
    with torch.device("meta"):
        expected = shapes_of(model_class(config).state_dict())
    try:
        with safe_open(weights, framework="pt") as handle:
            saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"drafter_path: cannot load the weights in {path} ({error}); the file is damaged or "
                        "truncated: train or copy the drafter again") from None
    check_tensor_shapes(saved, expected, "drafter_path", str(weights), ignored=None)


def load_drafting(drafter_path: str, target: FrozenTarget, device: torch.device | str,
                  trust_remote_code: bool = False) -> Any:
    """A drafter folder (`specdistill train` output of any registered kind, or a Hugging Face causal LM on the
    target's tokenizer, i.e. a token-level drafter) → its `Drafting` for `target`, after checking it fits."""
    from specdistill.distill.drafters.token_lm import load_causal_lm_drafting

    path = Path(drafter_path).expanduser()
    model_type = read_drafter_config(path)["model_type"]
    kind = kind_of_model_type(model_type)
    if kind is None:
        return load_causal_lm_drafting(path, model_type, target, device, trust_remote_code)
    drafter = load_weights_checked(kind.model_class, path)
    drafter.check_target(target, "drafter_path")
    drafter = drafter.to(device=device, dtype=target.model.dtype).eval()
    drafter.attach_target(target)
    return drafter.drafting(device)
