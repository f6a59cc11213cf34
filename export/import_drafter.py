"""specdistill import: a drafter folder in a serving engine's layout (ours from `specdistill export`, or a published
EAGLE / EAGLE-3 checkpoint) → a specdistill drafter folder that eval decodes and train continues (`init_from=`).

    specdistill import source=exports/eagle3-vllm out_dir=drafters/eagle3
    specdistill import source=<folder of a published EAGLE-3 drafter> format=speculators out_dir=...
    specdistill train drafter=eagle3 init_from=drafters/eagle3 ...        # continue training it

setup (read config.json, model.safetensors, our specdistill_export.json when present) → convert (the kind's
`from_engine_layout`, which checks every tensor against the config and d2t against the vocabulary) → save.
The format is detected from config.json unless `format=` names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.drafters import registry
from specdistill.distill.drafters.engine_layouts import EngineLayout, ExportUnsupported
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.json_files import read_json
from specdistill.distill.outputs import check_not_inside, check_out_dir, json_text, mark_stage, replace_folder
from specdistill.export.export import PROVENANCE_FILE, PROVENANCE_KEYS

log = logging.getLogger("specdistill.import")


@dataclass
class ImportConfig:
    source: str = MISSING  # an engine-layout drafter folder
    format: Optional[str] = None  # vllm | speculators | sglang; null: detected from config.json
    out_dir: str = "${hydra:runtime.output_dir}/drafter"
    overwrite: bool = False  # replace an out_dir that holds files import did not write (distill/outputs.py)


def register_configs() -> None:
    ConfigStore.instance().store(name="import_schema", node=ImportConfig)


def read_layout(source: Path, format: Optional[str]) -> EngineLayout:
    """config.json, model.safetensors and our provenance file of an engine folder, with one clear message each."""
    config = registry.read_json_file(source / "config.json", "source",
                                     "pass a drafter folder in a serving engine's layout (config.json, model.safetensors)",
                                     "export or download it again")
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"source: {source} has no model.safetensors (sharded or .bin checkpoints: save it as one "
                        "safetensors file first)")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise UserError(f"source: cannot read {weights} ({error}); the file is damaged or truncated") from None
    provenance_path = source / PROVENANCE_FILE
    provenance = read_json(provenance_path, "source", "export the drafter again") if provenance_path.is_file() else {}
    detected = "speculators" if "speculators_model_type" in config else (
        "sglang" if any(name.startswith("midlayer.") for name in tensors) or
        config.get("architectures") == ["LlamaForCausalLMEagle"] else "vllm")
    if format is not None and format != detected:
        log.warning("format=%s given; config.json looks like %s", format, detected)
    return EngineLayout(format or detected, config, tensors,
                        {key: provenance.get(key) for key in PROVENANCE_KEYS})


def import_drafter(source: Path, out_dir: Path, format: Optional[str] = None, overwrite: bool = False) -> Path:
    """Import (module doc) → the drafter folder."""
    check_not_inside(out_dir, source, "source")
    check_out_dir(out_dir, "import", overwrite, replaces=True)
    if format not in (None, "vllm", "speculators", "sglang"):
        raise UserError(f"format={format}: import reads vllm, speculators or sglang folders (format=hf folders are "
                        "already specdistill drafters: use them as drafter_path directly)")
    layout = read_layout(source, format)
    architecture = (layout.config.get("architectures") or [""])[0]  # speculators' too (Eagle3Speculator, ...)
    kind = registry.kind_of_engine_architecture(architecture)
    if kind is None:
        importable = "; ".join(f"{name}: {', '.join(architectures)}"
                               for name, architectures in registry.importable_architectures().items())
        raise ExportUnsupported(f"source: {source / 'config.json'} has architectures {architecture!r}, which no "
                                f"drafter kind imports ({importable})")
    drafter = kind.model_class.from_engine_layout(layout, f"source ({source})")
    with replace_folder(out_dir) as staging:
        drafter.save_pretrained(staging, safe_serialization=True)
        record = {"source": str(source.resolve()), "format": layout.format, "drafter_kind": kind.name}
        (staging / "imported_from.json").write_text(json_text(record, indent=2))
        mark_stage(staging, "import")
    log.info("imported %s (%s, %s) → %s", source, layout.format, kind.name, out_dir)
    print(f"drafter: {out_dir}  (specdistill eval drafter_path={out_dir} ...; train init_from={out_dir} ...)")
    return out_dir


@hydra.main(config_path=CONFIG_DIR, config_name="import", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    import_drafter(Path(cfg.source).expanduser(), Path(cfg.out_dir).expanduser(), cfg.format, cfg.overwrite)


register_configs()

if __name__ == "__main__":
    main()
