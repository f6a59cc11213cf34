"""The model card (README.md) of an exported drafter: what it is, what it was trained on and how, how well it
drafts (the eval reports), and the exact commands that serve it.

Everything comes from files the earlier stages wrote: the drafter folder's config.json (kind, target, revision),
its weights (parameter count), resolved_config.yaml (the recipe) and summary.json (steps, final validation top-1),
the prep output's stats.json (the training data), and the rows of `specdistill eval` report.json files.

Secrets: keys of the resolved config that name a secret are dropped (`is_secret_key`), and a card whose text
contains the value of a token or API key from the environment (or the Hugging Face login) is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from specdistill.distill.drafters.registry import kind_of_folder, read_drafter_config
from specdistill.distill.errors import UserError

DEFAULT_LICENSE = "apache-2.0"
# export formats named after the engine that loads them; any other format is specdistill's own layout
ENGINE_LIBRARIES = {"vllm": "vllm", "sglang": "sglang"}
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
MIN_SECRET_LENGTH = 8  # shorter values (a test's "x") would match ordinary text by chance
# parameters are the floating-point tensors; integer and boolean tensors are index tables (EAGLE-3's d2t / t2d)
PARAMETER_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
RECIPE_TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "max_length")
# (report key, column title, number format, unit); a column is shown when some report has its key
REPORT_COLUMNS = (
    ("bench", "bench", None, ""), ("method", "method", None, ""), ("temperature", "T", "g", ""),
    ("tau", "τ", ".2f", ""), ("alpha_per_position", "α per position", ".2f", ""), ("speedup", "speedup", ".2f", "×"),
    ("predicted_speedup", "predicted speedup", ".2f", "×"), ("cost_ratio", "c", ".3f", ""),
    ("num_prompts", "prompts", None, ""), ("new_tokens", "new tokens", None, ""),
    ("lossless_check", "lossless", None, ""), ("hardware", "hardware", None, ""), ("machine", "machine", None, ""),
)


def build_model_card(drafter_dir: Path, export_format: str, engine_config: dict, serve_commands: dict[str, str],
                     reports: list[dict], repo_id: str | None = None) -> ModelCard:
    """The card of the drafter in `drafter_dir` (a `specdistill train` output) exported as `export_format`.

    `engine_config` is the exported config.json, `serve_commands` maps an engine name to its exact command line,
    `reports` are rows of `specdistill eval` report.json files (distill/reports.py `report_rows`; may be empty),
    `repo_id` names the card (default: the drafter kind and target). Save it with `card.save(<export>/README.md)`."""
    drafter_dir = Path(drafter_dir)
    config = read_drafter_config(drafter_dir)
    resolved = read_resolved_config(drafter_dir)
    kind = kind_of_folder(config, drafter_dir).name
    target, revision = target_reference(config, resolved)
    hub_target = target if target and is_hub_repo_id(target) else None
    data = ModelCardData(
        license=resolved.get("license") or DEFAULT_LICENSE,
        base_model=hub_target,  # only a Hub id: the Hub rejects a local path here
        library_name=ENGINE_LIBRARIES.get(export_format, "specdistill"),
        tags=list(dict.fromkeys(["speculative-decoding", "specdistill", kind, export_format])),
    )
    sections = [
        overview(repo_id, kind, target, hub_target, export_format),
        model_table(kind, config, drafter_dir, target, revision, export_format, engine_config),
        training_section(drafter_dir, resolved),
        evaluation_section(reports),
        serving_section(serve_commands),
        engine_config_section(engine_config),
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    refuse_secrets(card.content)
    return card


# ---------------------------------------------------------------------------------------------------------------
# What the drafter folder records


def read_resolved_config(drafter_dir: Path) -> dict:
    """resolved_config.yaml without secret-named keys; {} when it is missing or unreadable."""
    path = drafter_dir / "resolved_config.yaml"
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return drop_secret_keys(loaded) if isinstance(loaded, dict) else {}


def is_secret_key(name: str) -> bool:
    """A key that names a secret: one holding secret, password, api_key/apikey, or ending in the word `token`
    (hf_token, auth_token). Not `token_weight` or `max_new_tokens`: words about tokens of text are kept."""
    lowered = name.lower()
    words = re.split(r"[^a-z0-9]+", lowered)
    return (any(word in lowered for word in ("secret", "password", "passwd", "api_key", "apikey"))
            or words[-1] == "token")


def drop_secret_keys(value: Any) -> Any:
    """`value` with every secret-named key removed, at any depth."""
    if isinstance(value, dict):
        return {key: drop_secret_keys(item) for key, item in value.items() if not is_secret_key(str(key))}
    if isinstance(value, list):
        return [drop_secret_keys(item) for item in value]
    return value


def target_reference(config: dict, resolved: dict) -> tuple[str | None, str | None]:
    """The target's name or path and revision: config.json's record, else the resolved config's `target` (a
    token-level drafter's config.json is a plain LM config that records neither)."""
    target = resolved.get("target") or {}
    return (config.get("target_name_or_path") or target.get("name_or_path"),
            config.get("target_revision") or target.get("revision"))


def is_hub_repo_id(name: str) -> bool:
    """A Hub repo id (`org/name`) rather than a local folder or the built-in toy: a valid id that is no existing
    path. Bare names are not taken as Hub ids: `toy` is the built-in target, and the Hub's legacy un-namespaced
    repos now live under organisations."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1 and not Path(name).expanduser().exists()


def count_parameters(folder: Path) -> int | None:
    """Floating-point elements in the folder's safetensors files (read from their headers); None without any."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_slice(name)
                if tensor.get_dtype() in PARAMETER_DTYPES:
                    total += math.prod(tensor.get_shape())
    return total


# ---------------------------------------------------------------------------------------------------------------
# Sections


def overview(repo_id: str | None, kind: str, target: str | None, hub_target: str | None, export_format: str) -> str:
    title = repo_id.split("/")[-1] if repo_id else f"{kind} drafter for {target or 'an unrecorded target'}"
    if hub_target:
        target_text = f"[`{hub_target}`](https://huggingface.co/{hub_target})"
    elif target:
        target_text = (f"the target `{target}` (a local path or the built-in toy, not a Hub repository, so this "
                       "card names no `base_model`)")
    else:
        target_text = "a target that was not recorded"
    return (f"# {title}\n\n"
            f"A speculative-decoding drafter of kind `{kind}` for {target_text}, trained with specdistill and "
            f"exported in the `{export_format}` layout. It proposes draft tokens that the target verifies, so the "
            "target's output is unchanged (greedy: token for token; sampling: same distribution); it is served "
            "together with the target, never on its own.")


def model_table(kind: str, config: dict, drafter_dir: Path, target: str | None, revision: str | None,
                export_format: str, engine_config: dict) -> str:
    parameters = count_parameters(drafter_dir)
    architectures = ", ".join(engine_config.get("architectures") or []) or "not set"
    rows = [
        ("drafter kind", f"`{kind}` (model_type `{config.get('model_type')}`)"),
        ("parameters", _parameter_text(parameters)),
        ("target (base model)", f"`{target}`" if target else "not recorded"),
        ("target revision", f"`{revision}`" if revision else "not recorded (the default branch when trained)"),
        ("export format", f"`{export_format}` (architectures: {architectures})"),
    ]
    return "## Model\n\n| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def training_section(drafter_dir: Path, resolved: dict) -> str:
    lines = ["## Training", "", f"- data: {training_data(resolved)}"]
    final = read_final_metrics(drafter_dir)
    if "step" in final:
        lines.append(f"- optimizer steps: {final['step']}")
    if final.get("val_top1") is not None:
        lines.append(f"- final validation top-1 (drafter's first token = target's): {final['val_top1']:.3f}")
    if final.get("val_loss") is not None:
        lines.append(f"- final validation loss: {final['val_loss']:.4f}")
    recipe = {key: resolved[key] for key in ("drafter", "objective", "optim", "init_from", "seed")
              if resolved.get(key) is not None}
    train = {key: resolved["train"][key] for key in RECIPE_TRAIN_KEYS if key in (resolved.get("train") or {})}
    if train:
        recipe["train"] = train
    if recipe:
        lines += ["", "The recipe (from the run's resolved_config.yaml):", "", "```yaml",
                  yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    else:
        lines += ["", "The recipe: not recorded (the drafter folder has no resolved_config.yaml)."]
    return "\n".join(lines)


def training_data(resolved: dict) -> str:
    """The prep output's source (its stats.json) when it can be read here, else what the config recorded."""
    data_dir = resolved.get("data_dir")
    stats = _read_json(Path(data_dir) / "stats.json") if data_dir else {}
    if stats.get("source"):
        counts = [f"{stats[key]:,} {label}" for key, label in (("train_records", "training records"),
                                                                ("tokens", "tokens")) if key in stats]
        return f"`{stats['source']}`" + (f" ({', '.join(counts)})" if counts else "")
    recorded = (resolved.get("data") or {}).get("path") or data_dir
    return f"`{recorded}`" if recorded else "not recorded"


def read_final_metrics(drafter_dir: Path) -> dict:
    final = _read_json(drafter_dir / "summary.json").get("final")
    return final if isinstance(final, dict) else {}


def evaluation_section(reports: list[dict]) -> str:
    if not reports:
        return ("## Evaluation\n\nNo evaluation recorded; run "
                "`specdistill eval drafter_path=<this drafter> bench=<bench>`, then export with "
                "`'reports=[<eval out_dir>]'`.")
    columns = [column for column in REPORT_COLUMNS if any(report.get(column[0]) is not None for report in reports)]
    lines = ["## Evaluation", "", "| " + " | ".join(title for _, title, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for report in reports:
        lines.append("| " + " | ".join(_cell(report.get(key), spec, unit) for key, _, spec, unit in columns) + " |")
    lines += ["", "τ: tokens committed per target forward pass, bonus token included (plain decoding: 1). α: "
              "acceptance at each draft position. speedup: generated tokens per second against plain autoregressive "
              "decoding of the same target; predicted speedup: Leviathan et al.'s estimate from α and c. c: one "
              "drafter step's time ÷ one target step's time."]
    return "\n".join(lines)


def serving_section(serve_commands: dict[str, str]) -> str:
    lines = ["## Serving"]
    for engine, command in serve_commands.items():
        lines += ["", f"### {engine}", "", "```bash", command, "```"]
    if not serve_commands:
        lines += ["", "No serving command for this export format."]
    return "\n".join(lines)


def engine_config_section(engine_config: dict) -> str:
    text = json.dumps(drop_secret_keys(engine_config), indent=2, sort_keys=True)
    return f"<details>\n<summary>Exported config.json</summary>\n\n```json\n{text}\n```\n\n</details>"


# ---------------------------------------------------------------------------------------------------------------
# Guard and helpers


def refuse_secrets(text: str) -> None:
    """A guard that should never fire: refuse a card holding the value of a token or API key."""
    secrets = {name: os.environ.get(name) for name in SECRET_ENV_VARS}
    secrets["the Hugging Face login token"] = get_token()
    for name, value in secrets.items():
        if value and len(value) >= MIN_SECRET_LENGTH and value in text:
            raise UserError(f"model card: the card text contains the value of {name}; not writing it. Remove the "
                            "secret from the drafter folder's files (resolved_config.yaml, config.json)")


def _parameter_text(count: int | None) -> str:
    """12.3M (12,345,678); a count under a thousand as is."""
    if count is None:
        return "unknown (no safetensors file in the drafter folder)"
    short = _short_count(count)
    return short if short == str(count) else f"{short} ({count:,})"


def _short_count(count: int) -> str:
    for divisor, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return str(count)


def _cell(value: Any, spec: str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return ", ".join(_cell(item, spec, unit) for item in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {item}" for key, item in value.items())
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:{spec}}{unit}" if math.isfinite(value) else "—"
    return str(value).replace("|", "\\|")


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is missing or not one (the card then says "not recorded")."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
