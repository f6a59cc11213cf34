"""`specdistill prep`: assistant-only loss masks for several chat templates, the CLI's output and its errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file

from specdistill.data_prep.chat import end_of_turn_ids, tokenize_conversation
from specdistill.distill.toy import toy_chat_conversations
from tests.conftest import run_cli

# The real Llama-3 Instruct template (content trimmed, <|eot_id|> ends a turn) and a Qwen-2.5-style ChatML one
# (a default system prompt when none is given, <|im_end|> then a newline ends a turn).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12, because (2 + 2) * 3 = 12.\nDone."},
        {"role": "user", "content": "Write a loop."},
        {"role": "assistant", "content": "for i in range(3):\n    print(i)"},
    ],
    [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "return x * 2  # doubled"},
    ],
]


def template_tokenizer(toy_tokenizer, style: str):
    """A Llama-3- or ChatML-style tokenizer made locally from the toy vocabulary plus that style's special tokens."""
    tokenizer = copy.deepcopy(toy_tokenizer)
    if style == "llama3":
        specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        tokenizer.chat_template = LLAMA3_TEMPLATE
    elif style == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def masked_runs(input_ids: list[int], loss_mask: list[int]) -> list[list[int]]:
    """The contiguous stretches of masked token ids."""
    runs, current = [], []
    for token_id, masked in zip(input_ids, loss_mask):
        if masked:
            current.append(token_id)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def assert_mask_is_assistant_turns(tokenizer, input_ids, loss_mask, messages):
    runs = masked_runs(input_ids, loss_mask)
    decoded = [tokenizer.decode(run, skip_special_tokens=True) for run in runs]
    assert decoded == [m["content"] for m in messages if m["role"] == "assistant"]
    # each run ends with the end-of-turn token, so the drafter learns where turns end
    assert all(run[-1] in end_of_turn_ids(tokenizer) for run in runs)


@pytest.mark.parametrize("style", ["toy", "llama3", "chatml"])
def test_mask_covers_exactly_the_assistant_turns(toy_tokenizer, style):
    tokenizer = template_tokenizer(toy_tokenizer, style)
    special_ids = end_of_turn_ids(tokenizer)
    for messages in CONVERSATIONS:
        input_ids, loss_mask = tokenize_conversation(tokenizer, messages, special_ids)
        assert input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                                      add_special_tokens=False)["input_ids"]
        assert_mask_is_assistant_turns(tokenizer, input_ids, loss_mask, messages)


def test_prep_cli_writes_a_masked_dataset(toy_dataset, toy_tokenizer):
    dataset_dir, result = toy_dataset
    assert f"wrote {dataset_dir}" in result.stdout
    dataset = datasets.load_from_disk(str(dataset_dir))
    assert set(dataset) == {"train", "validation"} and len(dataset["validation"]) > 0
    stats = json.loads((dataset_dir / "stats.json").read_text())
    conversations = toy_chat_conversations(split="chat", seed=0)
    assert stats["records_in"] == len(conversations) == stats["records_kept"] + stats["records_dropped"]
    assert stats["records_dropped"] == 0 and stats["truncated_to_max_length"] == 0
    assert stats["train_records"] + stats["validation_records"] == stats["records_kept"]
    assert 0 < stats["masked_fraction"] < 1

    # every masked stretch decodes to one assistant turn, and every assistant turn is there once
    decoded = []
    for split in dataset.values():
        for row in split:
            assert len(row["input_ids"]) == len(row["loss_mask"]) <= 1024
            decoded += [toy_tokenizer.decode(run, skip_special_tokens=True)
                        for run in masked_runs(row["input_ids"], row["loss_mask"])]
    expected = [m["content"] for conv in conversations for m in conv["messages"] if m["role"] == "assistant"]
    assert sorted(decoded) == sorted(expected)

    counts = load_file(str(dataset_dir / "token_counts.safetensors"))["counts"]
    train_masked = sum(sum(row["loss_mask"]) for row in dataset["train"])
    assert counts.sum().item() == train_masked and counts.shape[0] >= len(toy_tokenizer)


def test_help_lists_groups_and_keys(tmp_path: Path):
    result = run_cli("prep", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "specdistill prep: tokenize conversations" in result.stdout
    assert "target: llama3_8b_instruct, qwen2_5_7b_instruct, qwen3_8b, smollm2_135m_instruct, toy, toy_tiny, vicuna_7b_v1_3" in result.stdout
    assert "max_length:" in result.stdout and "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_misspelled_override_names_the_key(tmp_path: Path):
    result = run_cli("prep", "data.max_lenght=5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: data.max_lenght: not a config key (did you mean data.max_length?); "
                                     "`--help` lists the keys")
    result = run_cli("prep", "data.format=sharegtp", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Invalid value 'sharegtp', expected one of [auto, sharegpt, messages, alpaca, text]" in result.stderr


def test_missing_data_file_is_one_clear_message(tmp_path: Path):
    result = run_cli("prep", "data=local", f"data.path={tmp_path}/nope.jsonl", f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-2:] == [
        f"error: data.path: file not found: {tmp_path}/nope.jsonl",
        "  Point data.path at a .jsonl/.json/.parquet file, a datasets folder, or a Hub dataset name.",
    ]
    assert "Traceback" not in result.stderr


MALFORMED = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"conversations": []},
    {"messages": [{"role": "user", "content": ["not", "a", "string"]}]},
    {"prompt": "no known field"},
]
GOOD = {"messages": [{"role": "user", "content": "print(1)"}, {"role": "assistant", "content": "print(2)"}]}


@pytest.mark.slow
def test_malformed_records_are_counted_by_index_or_fatal(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in [GOOD, *MALFORMED, GOOD]) + "\n")
    ok = run_cli("prep", "target=toy_tiny", "data=local", f"data.path={path}", f"out_dir={tmp_path}/ok", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    stats = json.loads((tmp_path / "ok" / "dataset" / "stats.json").read_text())
    assert stats["records_in"] == 7 and stats["records_kept"] == 2
    assert stats["dropped_by_reason"] == {"malformed": 5}
    assert [example["index"] for example in stats["malformed_examples"]] == [1, 2, 3, 4, 5]
    assert "prep: skipped record 2: messages[0].role is 'wizard'" in ok.stdout

    fatal = run_cli("prep", "target=toy_tiny", "data=local", f"data.path={path}", "data.on_error=raise",
                    f"out_dir={tmp_path}/fatal", cwd=tmp_path)
    assert fatal.returncode == 2
    assert f"error: {path}: record 1: conversation has no assistant turn after a user turn" in fatal.stderr
    assert "Traceback" not in fatal.stderr and not (tmp_path / "fatal" / "dataset").exists()

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(json.dumps(record) for record in MALFORMED) + "\n")
    none_left = run_cli("prep", "target=toy_tiny", "data=local", f"data.path={only_bad}", f"out_dir={tmp_path}/bad",
                        cwd=tmp_path)
    assert none_left.returncode == 2
    assert f"error: data.path: no usable records in {only_bad}: 5 read, all dropped" in none_left.stderr


@pytest.mark.slow
def test_each_command_names_what_is_missing(tmp_path: Path):
    result = run_cli("export", cwd=tmp_path)
    assert result.returncode == 2 and "error: drafter_path is required but was not set" in result.stderr
    result = run_cli("import", cwd=tmp_path)
    assert result.returncode == 2 and "error: source is required but was not set" in result.stderr
    result = run_cli("train", cwd=tmp_path)  # built: a missing mandatory key is named
    assert result.returncode == 2 and "error: data_dir is required but was not set" in result.stderr
    result = run_cli("eval", cwd=tmp_path)
    assert result.returncode == 2 and "error: drafter_path is not set: pass drafter_path=" in result.stderr
    result = run_cli("run", cwd=tmp_path)  # nothing to run: name the experiment to choose
    assert result.returncode == 2 and "experiment=quickstart" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("prepp", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'prepp'" in result.stderr


def test_multirun_sweeps_write_one_dataset_per_job(tmp_path: Path, cache_dir: Path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    result = run_cli("prep", "--multirun", "target=toy_tiny", "data=local", f"data.path={path}",
                     "data.max_length=12,64", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lengths = []
    for job in ("0", "1"):
        stats = json.loads((tmp_path / "sweep" / job / "dataset" / "stats.json").read_text())
        lengths.append(stats["max_length"])
        rows = datasets.load_from_disk(str(tmp_path / "sweep" / job / "dataset"))["train"]
        assert all(len(row["input_ids"]) <= stats["max_length"] for row in rows)
    assert lengths == [12, 64]


@pytest.mark.slow
def test_python_dash_m_entry_points(tmp_path: Path):
    """`python -m specdistill.<stage>` runs the stage, from any folder (the installed namespace, not the checkout)."""
    import subprocess
    import sys

    for module, header in [("specdistill.data_prep", "specdistill prep: tokenize conversations"),
                           ("specdistill.train", "specdistill train: distill a drafter"),
                           ("specdistill.eval", "specdistill eval: decode the bench's prompts")]:
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and header in result.stdout, result.stderr


def test_install_puts_no_top_level_train_eval_or_conf_on_the_path(tmp_path: Path):
    """Installing specdistill must not shadow another project's `train`, `eval`, `conf`, `distill` or `data_prep`."""
    import subprocess
    import sys

    script = ("import importlib.util, json; "
              "print(json.dumps({name: importlib.util.find_spec(name) is not None "
              "for name in ['train', 'eval', 'conf', 'distill', 'data_prep', 'specdistill.train', 'specdistill.eval', "
              "'specdistill.distill', 'specdistill.data_prep', 'specdistill.export', 'specdistill.cli']}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    import json

    found = json.loads(result.stdout)
    assert not any(found[name] for name in ["train", "eval", "conf", "distill", "data_prep"]), found
    assert all(found[f"specdistill.{name}"] for name in ["train", "eval", "distill", "data_prep", "export", "cli"]), found
