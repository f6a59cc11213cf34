"""specdistill export: a trained drafter in the layout a serving engine loads, with a model card, optionally pushed to
the Hugging Face Hub.

    specdistill export drafter_path=<train out>/drafter format=vllm out_dir=exports/eagle3-vllm
    specdistill export drafter_path=... format=speculators          # `vllm serve <out_dir>` with no flags
    specdistill export drafter_path=... format=sglang
    specdistill export drafter_path=... format=hf                   # our folder + code (trust_remote_code)
    specdistill export drafter_path=... 'reports=[<eval out_dir>]'  # the eval's numbers in the model card
    specdistill export drafter_path=... format=vllm push.repo_id=org/name [push.private=true] [push.dry_run=true]

setup (read and check the drafter) → convert (the kind's `engine_layout`, distill/drafters/<kind>.py) → save
(config.json, model.safetensors, specdistill_export.json, README.md, renamed into place) → push.

Formats × kinds: EAGLE-3 → vllm, speculators, sglang, hf; EAGLE-1 (and FSPAD with both switches off) → vllm,
sglang, hf; FSPAD, Medusa → hf; token_lm (a plain causal LM) → vllm (draft-model mode), hf. Any other pair says so
in one line and exits 2. `specdistill import` reads an engine folder back (export/import_drafter.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from safetensors.torch import save_file

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.decoding import DecodingConfig, check_decoding
from specdistill.distill.drafters import registry
from specdistill.distill.drafters.engine_layouts import EngineLayout, ExportUnsupported
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.outputs import check_not_inside, check_out_dir, json_text, mark_stage, replace_folder
from specdistill.distill.reports import read_report, report_rows
from specdistill.export.hub import PushConfig, push_export

log = logging.getLogger("specdistill.export")
PROVENANCE_FILE = "specdistill_export.json"  # what we know that the engine does not read; import reads it back
PROVENANCE_KEYS = ("target_name_or_path", "target_revision", "target_fingerprint", "target_num_layers")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportFormat(Enum):
    vllm = "vllm"
    speculators = "speculators"
    sglang = "sglang"
    hf = "hf"


@dataclass
class ExportConfig:
    drafter_path: str = MISSING  # a `specdistill train` drafter folder
    format: ExportFormat = ExportFormat.vllm
    out_dir: str = "${hydra:runtime.output_dir}/export"
    dtype: str = "auto"  # auto (as trained) | bfloat16 | float16 | float32; d2t stays int64
    # drafted tokens per step (eval.gamma's default and range: distill/decoding.py), written into the speculators
    # config and the serve commands
    gamma: int = DecodingConfig.gamma
    # the target as servers should load it (speculators' verifier.name_or_path, the serve commands); null: the name
    # the drafter recorded (a Hub name, or a folder; the toy target records "toy", which only specdistill resolves)
    verifier: Optional[str] = None
    # `specdistill eval` report.json files (or eval out_dirs) whose rows for this drafter the model card shows
    reports: list[str] = field(default_factory=list)
    push: PushConfig = field(default_factory=PushConfig)
    overwrite: bool = False  # replace an out_dir that holds files export did not write (distill/outputs.py)


def register_configs() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


# ---- setup ------------------------------------------------------------------------------------------------------

def formats_of(kind: registry.DrafterKind, config: dict) -> tuple[str, ...]:
    """The formats a drafter exports to: its kind's engine layouts for its config, plus `hf` (our folder) always."""
    return (*kind.model_class.formats_for(config), "hf")


def check_format(kind: registry.DrafterKind, config: dict, format: str, path: Path) -> None:
    formats = formats_of(kind, config)
    if format not in formats:
        raise ExportUnsupported(f"format={format}: this {kind.name} drafter exports to {', '.join(formats)}; no "
                                f"serving engine loads it as {format} ({path})")


# ---- convert ----------------------------------------------------------------------------------------------------

def cast(layout: EngineLayout, dtype: str) -> EngineLayout:
    """Floating tensors to `dtype` (auto: as trained); integer and boolean maps (d2t, t2d) unchanged."""
    if dtype == "auto":
        return layout
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: use auto, {', '.join(DTYPES)}")
    tensors = {name: tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor
               for name, tensor in layout.tensors.items()}
    config = {**layout.config, "torch_dtype": dtype}
    if "transformer_layer_config" in config:  # speculators: the draft layers' own config says it too
        config["transformer_layer_config"] = {**config["transformer_layer_config"], "torch_dtype": dtype}
    return EngineLayout(layout.format, config, tensors, layout.provenance)


def serve_commands(kind: registry.DrafterKind, format: str, target: str, drafter: str, gamma: int) -> dict:
    """How to serve this export, per engine (what the model card shows); the engines' names for the kind's method are
    the kind's `speculative_methods`."""
    if format == "hf" and kind.saves_plain_causal_lm:  # transformers' own classes, no remote code
        return {"python": f"from transformers import AutoModelForCausalLM\n"
                          f"drafter = AutoModelForCausalLM.from_pretrained({drafter!r})"}
    if format == "hf":
        return {"python": f"from transformers import AutoModel\n"
                          f"# trust_remote_code runs the modelling files in this folder (specdistill's own): read them first\n"
                          f"drafter = AutoModel.from_pretrained({drafter!r}, trust_remote_code=True)"}
    if format == "speculators":
        return {"vllm": f"vllm serve {drafter}"}
    method = kind.model_class.speculative_methods[format]
    if format == "sglang":
        return {"sglang": f"python -m sglang.launch_server --model-path {target} --speculative-algorithm {method} "
                          f"--speculative-draft-model-path {drafter} --speculative-num-steps {gamma} "
                          f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {gamma + 1}"}
    settings = getattr(kind.model_class, "speculative_settings", {}).get(format, {})  # e.g. P-EAGLE's parallel_drafting
    spec = json.dumps({"method": method, "model": drafter, "num_speculative_tokens": gamma, **settings})
    return {"vllm": f"vllm serve {target} --speculative-config '{spec}'"}


# ---- save -------------------------------------------------------------------------------------------------------

def write_layout(layout: EngineLayout, folder: Path) -> None:
    """config.json + model.safetensors (+ specdistill_export.json) into `folder`."""
    (folder / "config.json").write_text(json_text(layout.config, indent=2) + "\n")
    save_file({name: tensor.contiguous() for name, tensor in layout.tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / PROVENANCE_FILE).write_text(json_text(layout.provenance, indent=2) + "\n")


def drafter_reports(drafter_path: Path, given: list[str]) -> list[dict]:
    """The model card's eval rows: the `reports=` given, each a report.json `specdistill eval` wrote or the eval
    out_dir holding it (eval never writes into the drafter folder it scores). A report comparing several drafters
    gives only the rows of this one, when it has any (else all: a drafter folder moved since it was evaluated)."""
    reports: list[dict] = []
    for given_path in given:
        rows = report_rows(read_report(given_path, "reports"))
        own = [row for row in rows if _names_folder(row.get("drafter"), drafter_path)]
        reports += own or rows
    return reports


def _names_folder(name: object, folder: Path) -> bool:
    try:
        return Path(str(name)).expanduser().resolve() == folder.expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def export(cfg: ExportConfig | DictConfig) -> Path:
    """Export (module doc) → the export folder."""
    format = cfg.format.value if isinstance(cfg.format, ExportFormat) else str(cfg.format)
    drafter_path, out_dir = Path(cfg.drafter_path).expanduser(), Path(cfg.out_dir).expanduser()
    check_decoding(cfg, "", keys=("gamma",))
    unused_push = [option.name for option in fields(PushConfig)
                   if getattr(cfg.push, option.name) != getattr(PushConfig(), option.name)]
    if unused_push and not cfg.push.repo_id:
        raise UserError(f"push.{unused_push[0]} is set but push.repo_id is not, so nothing would be pushed; add "
                        "push.repo_id=<org>/<name> (with push.dry_run=true to only list the files)")
    check_not_inside(out_dir, drafter_path, "drafter_path")
    check_out_dir(out_dir, "export", cfg.overwrite, replaces=True)
    config = registry.read_drafter_config(drafter_path)
    kind = registry.kind_of_folder(config, drafter_path)
    check_format(kind, config, format, drafter_path)  # before loading any weights
    # a plain causal LM is exported as it is: its folder is already what the engines load
    drafter = None if kind.saves_plain_causal_lm else registry.load_weights_checked(kind.model_class, drafter_path)
    if cfg.verifier:
        config["target_name_or_path"] = cfg.verifier
        if drafter is not None:
            drafter.config.target_name_or_path = cfg.verifier
    provenance = {"drafter_kind": kind.name, "format": format,
                  "source": str(drafter_path.resolve()), "feature_layers": config.get("feature_layers"),
                  **{key: config.get(key) for key in PROVENANCE_KEYS}}
    with replace_folder(out_dir) as staging:
        if drafter is not None and format != "hf":
            layout = cast(drafter.engine_layout(format, cfg.gamma), cfg.dtype)
            layout.provenance.update(provenance)
            write_layout(layout, staging)  # (provenance included)
            engine_config = layout.config
        else:  # our own folder, or a plain causal LM, which is already what vLLM's draft-model mode loads
            export_hf_folder(kind, drafter_path, staging)
            engine_config = json.loads((staging / "config.json").read_text())
            (staging / PROVENANCE_FILE).write_text(json_text(provenance, indent=2) + "\n")
        location = cfg.push.repo_id or str(out_dir.resolve())
        target = config.get("target_name_or_path") or config.get("_name_or_path") or "<target>"
        commands = serve_commands(kind, format, target, location, cfg.gamma)
        from specdistill.export.model_card import build_model_card

        card = build_model_card(drafter_path, format, engine_config, commands,
                                drafter_reports(drafter_path, list(cfg.reports)), cfg.push.repo_id)
        card.save(staging / "README.md")
        mark_stage(staging, "export")
    log.info("exported %s as %s → %s", drafter_path, format, out_dir)
    for engine, command in commands.items():
        print(f"{engine}:  {command}")
    if cfg.push.repo_id:
        identity = {"architectures": engine_config.get("architectures"), "base_model": config.get("target_name_or_path"),
                    "drafter_kind": kind.name}
        print(push_export(out_dir, cfg.push, identity))
    return out_dir


def export_hf_folder(kind: registry.DrafterKind, drafter_path: Path, folder: Path) -> None:
    """Our own folder, with the modelling code for `trust_remote_code` (a causal LM is copied as it is)."""
    if kind.saves_plain_causal_lm:
        copy_causal_lm(drafter_path, folder)
        return
    from specdistill.export.remote_code import export_hf

    export_hf(drafter_path, folder, kind.model_class)


def copy_causal_lm(source: Path, folder: Path) -> None:
    """A token-level drafter's folder: config, weights, tokenizer and generation files, nothing of training."""
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export(OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg)


register_configs()

if __name__ == "__main__":
    main()
