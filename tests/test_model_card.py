"""build_model_card on a tiny fake drafter folder: metadata, the numbers and commands in the text, the parameter
count, secrets kept out, and a save / load round trip. No network."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from specdistill.distill.errors import UserError
from specdistill.export.model_card import build_model_card, is_secret_key

TARGET = "meta-llama/Llama-3.1-8B-Instruct"
WANDB_SECRET = "wandb-secret-value-0123456789"
HF_SECRET = "hf_testsecret123"
# fc 8×24 + norm 8 + lm_head 16×8 = 328 parameters; d2t / t2d are index tables, not parameters
WEIGHTS = {"fc.weight": torch.zeros(8, 24), "norm.weight": torch.zeros(8), "lm_head.weight": torch.zeros(16, 8),
           "d2t": torch.zeros(16, dtype=torch.int64), "t2d": torch.zeros(32, dtype=torch.bool)}
SERVE = {
    "vllm": f"vllm serve {TARGET} --speculative-config '{{\"method\": \"eagle3\", \"model\": \"my-org/d\", "
            "\"num_speculative_tokens\": 3}'",
    "sglang": f"python -m sglang.launch_server --model-path {TARGET} --speculative-algorithm EAGLE3 "
              "--speculative-draft-model-path my-org/d --speculative-num-steps 3",
}
ENGINE_CONFIG = {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": 16,
                 "eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 16, 29], "use_aux_hidden_state": True}}
REPORT = {"target": TARGET, "drafter": "drafter", "bench": "mt_bench", "temperature": 0.0, "method": "chain",
          "tau": 3.14, "alpha_per_position": [0.8, 0.6, 0.4], "speedup": 2.25, "predicted_speedup": 2.5,
          "tokens_per_s": 90.0, "baseline_tokens_per_s": 40.0, "cost_ratio": 0.051, "num_prompts": 80,
          "new_tokens": 256, "lossless_check": "passed", "config": {}}


@pytest.fixture(autouse=True)
def hub_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))


@pytest.fixture
def drafter_dir(tmp_path: Path) -> Path:
    """What `specdistill train` leaves: config.json, weights, resolved_config.yaml, summary.json; and the prep
    output's stats.json that data_dir points to."""
    dataset = tmp_path / "prep" / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "stats.json").write_text(json.dumps({"source": "data/sharegpt.jsonl", "train_records": 900,
                                                    "tokens": 123456}))
    folder = tmp_path / "drafter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "specdistill_eagle3", "target_name_or_path": TARGET,
                                                    "target_revision": "0e9e39f2"}))
    save_file(WEIGHTS, str(folder / "model.safetensors"))
    resolved = {
        "target": {"name_or_path": TARGET, "revision": "0e9e39f2", "hf_token": HF_SECRET},
        "data_dir": str(dataset),
        "drafter": {"num_layers": 1, "draft_vocab_size": 16},
        "objective": {"token_weight": 1.0, "ttt_steps": 7},
        "optim": {"lr": 3e-5, "warmup_ratio": 0.1},
        "logger": {"name": "wandb", "wandb_api_key": WANDB_SECRET},
        "train": {"max_steps": 300, "batch_size": 4, "grad_accum": 2, "max_length": 2048, "log_every": 10},
        "seed": 0,
    }
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(resolved))
    (folder / "summary.json").write_text(json.dumps({"final": {"step": 300, "val_top1": 0.75, "val_loss": 1.5}}))
    return folder


def test_card_metadata(drafter_dir: Path) -> None:
    card = build_model_card(drafter_dir, "vllm", ENGINE_CONFIG, SERVE, [REPORT], repo_id="my-org/d")
    assert card.data.to_dict() == {"base_model": TARGET, "library_name": "vllm", "license": "apache-2.0",
                                   "tags": ["speculative-decoding", "specdistill", "eagle3", "vllm"]}


def test_card_text_has_model_training_eval_and_serving(drafter_dir: Path) -> None:
    text = build_model_card(drafter_dir, "vllm", ENGINE_CONFIG, SERVE, [REPORT], repo_id="my-org/d").text
    assert text.startswith("\n# d\n")
    assert "| parameters | 328 |" in text
    assert "`0e9e39f2`" in text and f"[`{TARGET}`](https://huggingface.co/{TARGET})" in text
    assert "`data/sharegpt.jsonl` (900 training records, 123,456 tokens)" in text
    assert "- optimizer steps: 300" in text and ": 0.750" in text
    recipe = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert recipe == {"drafter": {"num_layers": 1, "draft_vocab_size": 16},
                      "objective": {"token_weight": 1.0, "ttt_steps": 7},  # token_weight is no secret
                      "optim": {"lr": 3e-5, "warmup_ratio": 0.1}, "seed": 0,
                      "train": {"max_steps": 300, "batch_size": 4, "grad_accum": 2, "max_length": 2048}}
    row = next(line for line in text.splitlines() if line.startswith("| mt_bench"))
    for cell in ("chain", "3.14", "0.80, 0.60, 0.40", "2.25×", "2.50×", "0.051", "passed"):
        assert f"| {cell} |" in row
    for engine, command in SERVE.items():
        assert f"### {engine}\n\n```bash\n{command}\n```" in text
    assert '"eagle_aux_hidden_state_layer_ids"' in text


def test_secrets_stay_out_of_the_card(drafter_dir: Path) -> None:
    content = build_model_card(drafter_dir, "vllm", ENGINE_CONFIG, SERVE, [REPORT]).content
    for secret in (WANDB_SECRET, HF_SECRET, "wandb_api_key", "hf_token"):
        assert secret not in content


def test_a_secret_value_in_the_card_is_refused(drafter_dir: Path) -> None:
    leaky = {"vllm": f"WANDB_API_KEY={WANDB_SECRET} vllm serve {TARGET}"}
    with pytest.raises(UserError, match="WANDB_API_KEY") as error:
        build_model_card(drafter_dir, "vllm", ENGINE_CONFIG, leaky, [REPORT])
    assert WANDB_SECRET not in str(error.value)


@pytest.mark.parametrize("key, secret", [
    ("hf_token", True), ("token", True), ("wandb_api_key", True), ("apiKey", True), ("client_secret", True),
    ("db_password", True), ("token_weight", False), ("max_new_tokens", False), ("on_policy_tokens", False),
    ("draft_vocab_size", False),
])
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_a_local_target_leaves_base_model_unset_and_names_the_path(drafter_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "checkpoints" / "my-target"
    local.mkdir(parents=True)
    config = json.loads((drafter_dir / "config.json").read_text())
    (drafter_dir / "config.json").write_text(json.dumps({**config, "target_name_or_path": str(local)}))
    card = build_model_card(drafter_dir, "sglang", ENGINE_CONFIG, SERVE, [REPORT])
    assert "base_model" not in card.data.to_dict()
    assert card.data.library_name == "sglang"
    assert f"`{local}`" in card.text and "names no `base_model`" in card.text


def test_missing_records_are_said_so(drafter_dir: Path) -> None:
    (drafter_dir / "resolved_config.yaml").unlink()
    (drafter_dir / "summary.json").unlink()
    text = build_model_card(drafter_dir, "hf", {}, {}, []).text
    assert "The recipe: not recorded" in text and "- data: not recorded" in text
    assert "No evaluation recorded; run `specdistill eval drafter_path=" in text
    assert "optimizer steps" not in text


def test_card_round_trips_through_readme(drafter_dir: Path, tmp_path: Path) -> None:
    card = build_model_card(drafter_dir, "vllm", ENGINE_CONFIG, SERVE, [REPORT], repo_id="my-org/d")
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.text == card.text
