"""Traps a new user falls into: a model path on top of the default toy target, a file on top of the default data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specdistill.distill.targets import load_target_model, target_dtype, tokenizer_fingerprint, uses_toy
from tests.conftest import compose, run_cli

# A template unlike the toy's, so a dataset shows which tokenizer rendered it.
USER_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"def f{i}(x):"}, {"from": "gpt", "value": f"return x + {i}"}]}
    for i in range(3)
]


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory, toy_tokenizer) -> Path:
    """A user's own model folder: a small random Llama (hidden size 32, unlike either toy) and its tokenizer."""
    folder = tmp_path_factory.mktemp("my_model")
    config = LlamaConfig(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.chat_template = USER_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_prep_with_a_model_path_uses_that_model_and_builds_no_toy(tmp_path: Path, user_model: Path):
    data = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    cache = tmp_path / "cache"  # fresh: a toy built by mistake would show up here
    result = run_cli("prep", f"target.name_or_path={user_model}", "data=local", f"data.path={data}",
                     f"cache_dir={cache}", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (cache / "toy_target").exists()
    assert f"target: {user_model}, from target.name_or_path (the toy preset's settings do not apply to it)" in (
        result.stdout + result.stderr
    )
    stats = json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())
    assert stats["records_kept"] == len(SHAREGPT)
    assert stats["tokenizer"]["name_or_path"] == str(user_model)
    assert stats["tokenizer"]["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(user_model))
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    rendered = [AutoTokenizer.from_pretrained(user_model).decode(row["input_ids"]) for row in dataset["train"]]
    assert all(text.startswith("### user:\ndef f") for text in rendered), rendered


def test_the_toy_presets_values_do_not_reach_a_users_model(user_model: Path):
    user = compose("prep", [f"target.name_or_path={user_model}", "out_dir=unused"]).target
    assert not uses_toy(user)
    assert target_dtype(user, torch.device("cuda")) == torch.bfloat16  # auto, not the toy's float32
    model = load_target_model(user, cache_dir="unused")  # loads the folder: nothing is built
    assert model.config.hidden_size == 32 and model.dtype == torch.float32

    overridden = compose("prep", [f"target.name_or_path={user_model}", "target.dtype=float16", "out_dir=unused"]).target
    assert target_dtype(overridden, torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("preset", ["toy", "toy_tiny"])
def test_the_toy_presets_keep_their_own_values(preset: str):
    """(Their drafters' taps are no value of theirs: the drafter kind's default for the target's depth,
    tests/test_eagle3_taps.py.)"""
    toy = compose("prep", [f"target={preset}", "out_dir=unused"]).target
    assert uses_toy(toy) and toy.name_or_path == preset
    assert target_dtype(toy, torch.device("cuda")) == torch.float32
    overridden = compose("prep", [f"target={preset}", "target.dtype=bfloat16", "out_dir=unused"]).target
    assert target_dtype(overridden, torch.device("cuda")) == torch.bfloat16  # a user's override beats the preset's


def test_a_sharegpt_file_on_the_default_data_group_is_read(tmp_path: Path, cache_dir: Path):
    data = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    result = run_cli("prep", "target=toy_tiny", f"data.path={data}", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())
    assert stats["format"] == "auto"
    assert stats["records_in"] == stats["records_kept"] == len(SHAREGPT)


def test_a_file_whose_records_are_all_dropped_fails_with_count_and_reason(tmp_path: Path, cache_dir: Path):
    data = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    result = run_cli("prep", "target=toy_tiny", f"data.path={data}", "data.format=messages",
                     f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-2:] == [
        f"error: data.path: no usable records in {data}: 3 read, all dropped (3 malformed); "
        "record 0: field 'messages' is missing, expected a list of turns",
        "  data.format=messages reads only that form: set data.format=auto to detect each record's form "
        "(sharegpt, messages, alpaca or text), or fix the records.",
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "dataset").exists()
