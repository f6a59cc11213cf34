"""The one place train/, eval/ and export look a drafter kind up.

A kind is one module in distill/drafters/ (or in another installed package, see below) that defines its model class
(`Options` dataclass, `Objectives` (the objective schemas it trains with, by their name in the `schema/objective`
group, the first its default), `build`, `check_target`, `load_initial_weights`, `prepare_batch`, `training_loss`,
`training_draft_logits`, `trained_rows`, `identity`, `save_pretrained`, `drafting`, `max_depth`,
`default_feature_layers` (what it reads of a target), `recognises` and `load_drafting` (its saved folders),
`formats_for`, `export_formats` and `speculative_methods` (its serving-engine layouts) — the protocol of
`feature.FeatureDrafter`) and ends with

    register_kind("<name>", ModelClass)

which makes `drafter=<name>` a config choice (conf/drafter/<name>.yaml starts from the `<name>` schema this stores
in Hydra's ConfigStore, so a misspelled key fails at start, and conf/objective/*.yaml from the objective schemas it
stores), lets `AutoModel.from_pretrained` reload its folders (`model_type` `specdistill_<name>`), and lets the
evaluator and export find the kind of a drafter folder by asking every kind whether it `recognises` the folder's
config.json. One name per kind: `<name>` is the `drafter=` choice, `drafter.kind`, the `model_type` suffix and the
`drafter_kind` that exports record. Kinds in other packages are found through the `specdistill.drafters`
entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel

from specdistill.distill.drafters.engine_layouts import check_tensor_shapes, shapes_of
from specdistill.distill.errors import UserError
from specdistill.distill.json_files import read_json
from specdistill.distill.target import FrozenTarget


MODEL_TYPE_PREFIX = "specdistill_"  # a kind's folders have model_type specdistill_<its registered name>


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
    def saves_plain_causal_lm(self) -> bool:
        """Whether its folders are plain Hugging Face causal LMs (no specdistill config class): exported as they are
        and loaded with transformers' own classes."""
        return self.model_type is None

    @property
    def options(self) -> type:
        return self.model_class.Options

    @property
    def objectives(self) -> dict[str, type]:
        """The objective schemas it trains with, by their `schema/objective` name; the first is its default."""
        return dict(self.model_class.Objectives)

    def default_feature_layers(self, num_layers: int) -> tuple[int, ...]:
        """The target layers a drafter of this kind with default options reads from a target of `num_layers`."""
        return tuple(self.model_class.default_feature_layers(num_layers))


_KINDS: dict[str, DrafterKind] = {}
_OBJECTIVE_SCHEMAS: dict[str, type] = {}  # schema/objective name → schema, over every kind


def register_kind(name: str, model_class: type) -> DrafterKind:
    """Register a drafter kind (module doc). Registering the same class again is a no-op."""
    kind = DrafterKind(name, model_class)
    if _KINDS.get(name, kind) != kind:
        raise ValueError(f"drafter kind {name!r} is already registered by {_KINDS[name].model_class.__name__}")
    check_one_name(kind)
    for schema_name, schema in kind.objectives.items():
        if _OBJECTIVE_SCHEMAS.setdefault(schema_name, schema) is not schema:
            raise ValueError(f"drafter kind {name!r}: objective schema name {schema_name!r} is already "
                             f"{_OBJECTIVE_SCHEMAS[schema_name].__name__}, not {schema.__name__}")
    _KINDS[name] = kind
    if kind.model_type is not None:
        AutoConfig.register(kind.model_type, model_class.config_class, exist_ok=True)
        AutoModel.register(model_class.config_class, model_class, exist_ok=True)
    try:  # Hydra is for training; the copy of this file `export format=hf` bundles loads without it
        from hydra.core.config_store import ConfigStore
    except ImportError:
        return kind
    store = ConfigStore.instance()
    store.store(group="schema/drafter", name=name, node=kind.options)
    for schema_name, schema in kind.objectives.items():
        store.store(group="schema/objective", name=schema_name, node=schema)
    return kind


def check_one_name(kind: DrafterKind) -> None:
    """The registered name is also the kind's `drafter.kind` default and its folders' `model_type` suffix."""
    option_default = next((field.default for field in fields(kind.options) if field.name == "kind"), None)
    if option_default != kind.name:
        raise ValueError(f"drafter kind {kind.name!r}: {kind.options.__name__}.kind defaults to {option_default!r}; "
                         f"set it to {kind.name!r}")
    if kind.model_type is not None and kind.model_type != MODEL_TYPE_PREFIX + kind.name:
        raise ValueError(f"drafter kind {kind.name!r}: its config's model_type is {kind.model_type!r}; name it "
                         f"{MODEL_TYPE_PREFIX + kind.name!r}")


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


def kind_of_folder(config: dict, path: Path) -> DrafterKind:
    """The kind that saved the drafter folder `path` (its config.json is `config`): the one kind that `recognises`
    it, or one clear message naming the folder."""
    claimed = [kind for kind in registered_kinds() if kind.model_class.recognises(config)]
    if len(claimed) == 1:
        return claimed[0]
    model_type = config.get("model_type")
    if not claimed:
        raise UserError(f"drafter_path: {path / 'config.json'} has model_type {model_type!r}, which no drafter kind "
                        f"recognises; known kinds: {', '.join(sorted(_KINDS))}")
    raise UserError(f"drafter_path: {path / 'config.json'} (model_type {model_type!r}) is recognised by several "
                    f"drafter kinds ({', '.join(kind.name for kind in claimed)}); a kind from a plugin package may claim "
                    "too much: uninstall it or make its `recognises` stricter")


def kinds_with_stop_head() -> list[str]:
    """The registered kinds that can train drafter.stop_head (those drafting one token per forward)."""
    return sorted(kind.name for kind in registered_kinds() if getattr(kind.model_class, "supports_stop_head", False))


def feature_layers_every_kind_reads(num_layers: int) -> list[int]:
    """Every target layer some registered kind reads with its default options from a target of `num_layers` layers
    (what prep caches by default): the layer ids ascending, the final normed state (−1) last."""
    layers = {layer for kind in registered_kinds() for layer in kind.default_feature_layers(num_layers)}
    return sorted(layers, key=lambda layer: (layer < 0, layer))


def importable_architectures() -> dict[str, tuple[str, ...]]:
    """kind name → the serving-engine `architectures` it imports (`engine_architectures`), for the kinds that do."""
    return {kind.name: architectures for kind in registered_kinds()
            if (architectures := vars(kind.model_class).get("engine_architectures", ()))}


def resolve_objective(kind: DrafterKind, objective: Any) -> Any:
    """The `objective` config as the kind's objective dataclass: the kind's default when None; a clear error when it
    is a schema the kind does not train with (e.g. objective=fkl with drafter=eagle1) or a value is invalid."""
    try:  # in a `try`, which transformers' import check skips: `export format=hf` bundles this file
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as error:
        raise UserError(f"objective: resolving an objective needs omegaconf ({error}); install specdistill") from None

    accepted = tuple(kind.objectives.values())
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
    return next((drafter_kind(name) for name, architectures in importable_architectures().items()
                 if architecture in architectures), None)


def read_json_file(path: Path, key: str, missing: str, damaged: str) -> dict:
    """A JSON object file, with one clear message (naming the config key `key`) for each way it can be unusable:
    `missing` says what to pass instead, `damaged` what to do about a damaged folder."""
    if not path.is_file():
        raise UserError(f"{key}: {path.parent} has no {path.name}; {missing}")
    return read_json(path, key, f"the folder is damaged, {damaged}")


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
    """A drafter folder (`specdistill train` output of any registered kind, or a folder a kind recognises as its own,
    e.g. a Hugging Face causal LM) → its `Drafting` for `target`, after the kind checked that it fits."""
    path = Path(drafter_path).expanduser()
    kind = kind_of_folder(read_drafter_config(path), path)
    return kind.model_class.load_drafting(path, target, device, trust_remote_code)
