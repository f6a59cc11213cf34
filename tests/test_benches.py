"""Benchmark prompt sets: local .jsonl files, the toy bench, Hub benches offline, and prompt rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.toy import ASSISTANT, toy_chat_conversations
from specdistill.distill.errors import UserError
from specdistill.eval.benches import BenchConfig, BenchPrompt, load_bench, render_prompt


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_local_file_prompt_and_turns_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({"prompt": "Say hi.", "category": "greeting", "id": "a1"}),
            "",  # blank lines are skipped
            json.dumps({"turns": ["First turn.", "Second turn."], "question_id": 81}),
            json.dumps({"prompt": "Third."}),
        ],
    )
    prompts = load_bench(BenchConfig(name="mine", path=str(path)), num_prompts=None)
    assert prompts == [
        BenchPrompt(id="a1", category="greeting", turns=["Say hi."]),
        BenchPrompt(id="81", category="mine", turns=["First turn."]),  # num_turns=1 keeps the first turn
        BenchPrompt(id="mine-2", category="mine", turns=["Third."]),
    ]
    both_turns = load_bench(BenchConfig(name="mine", path=str(path), num_turns=2), num_prompts=None)
    assert both_turns[1].turns == ["First turn.", "Second turn."]
    fixed = load_bench(BenchConfig(name="mine", path=str(path), category="fixed"), num_prompts=None)
    assert {p.category for p in fixed} == {"fixed"}


def test_num_prompts_takes_the_first_in_file_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(10)])
    prompts = load_bench(BenchConfig(path=str(path)), num_prompts=3)
    assert [p.turns[0] for p in prompts] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"text": "no prompt field"}), "no 'prompt' or 'turns' field"),
        (json.dumps({"prompt": 42}), "not a string or a non-empty list of strings"),
        (json.dumps({"turns": []}), "not a string or a non-empty list of strings"),
        (json.dumps(["a list"]), "not an object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "fine"}), bad_line])
    with pytest.raises(UserError) as error:
        load_bench(BenchConfig(path=str(path)), num_prompts=None)
    message = str(error.value)
    assert f"{path}, line 2" in message and expected in message
    assert '{"prompt": str}' in message or "strings" in message  # says what is expected


def test_non_utf8_line_names_file_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "cp1252.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n\n{"prompt": "\x93quoted\x94"}\n')
    with pytest.raises(UserError) as error:
        load_bench(BenchConfig(path=str(path)), num_prompts=None)
    assert str(error.value) == f"{path}, line 3: not UTF-8 text (byte 0x93 at column 13); save the file as UTF-8"


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"prompt": "café"}).encode() + b"\n")
    assert load_bench(BenchConfig(path=str(path)), num_prompts=None)[0].turns == ["café"]


def test_an_empty_prompt_or_a_missing_configured_field_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "fine"}), json.dumps({"turns": ["  ", "b"]})])
    with pytest.raises(UserError, match=rf"^{path}, line 2: field 'turns' holds an empty prompt"):
        load_bench(BenchConfig(path=str(path)), num_prompts=None)
    path = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"text": "no prompt"})])
    with pytest.raises(UserError, match=r"line 1: no 'prompt' or 'turns' field nor bench.prompt_field='question'"):
        load_bench(BenchConfig(path=str(path), prompt_field="question"), num_prompts=None)


def test_empty_or_missing_file_is_a_user_error(tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError, match="no prompts"):
        load_bench(BenchConfig(name="empty", path=str(empty)), num_prompts=None)
    with pytest.raises(UserError, match="no such file"):
        load_bench(BenchConfig(path=str(tmp_path / "absent.jsonl")), num_prompts=None)


def test_toy_bench_is_deterministic_and_held_out() -> None:
    prompts = load_bench(BenchConfig(name="toy"), num_prompts=None, seed=0)
    assert len(prompts) >= 20
    assert all(p.category == "toy-code" and len(p.turns) == 1 and p.turns[0].strip() for p in prompts)
    assert any(p.system for p in prompts)  # some conversations carry a system message; it is not a turn
    assert load_bench(BenchConfig(name="toy"), num_prompts=None, seed=0) == prompts
    assert load_bench(BenchConfig(name="toy"), num_prompts=5, seed=0) == prompts[:5]
    chat_user_turns = {
        m["content"] for c in toy_chat_conversations(split="chat", seed=0) for m in c["messages"] if m["role"] == "user"
    }
    # Drafters train on the chat split; a bench prompt seen in training would inflate acceptance. The splits hold
    # different files, but a few stdlib files are near copies (codepage tables), so allow a rare shared chunk.
    seen_in_training = [p for p in prompts if p.turns[0] in chat_user_turns]
    assert len(seen_in_training) <= len(prompts) // 100


def test_offline_hub_bench_says_to_pass_a_local_path() -> None:
    cfg = BenchConfig(name="gsm8k", hub_name="openai/gsm8k", hub_config="main", split="test", prompt_field="question")
    with pytest.raises(UserError) as error:
        load_bench(cfg, num_prompts=4)
    message = str(error.value)
    assert "gsm8k" in message and "openai/gsm8k" in message and "bench.path=" in message


def test_spec_bench_without_path_says_where_to_download() -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.load(Path(CONFIG_DIR) / "bench/spec_bench.yaml"))
    with pytest.raises(UserError, match=r"question\.jsonl.*Spec-Bench.*bench\.path="):
        load_bench(cfg, num_prompts=None)


def test_every_bench_yaml_fits_the_schema() -> None:
    files = sorted((Path(CONFIG_DIR) / "bench").glob("*.yaml"))
    assert {f.stem for f in files} >= {"toy", "mt_bench", "gsm8k", "humaneval", "alpaca", "spec_bench", "local"}
    for file in files:
        assert file.read_text().startswith("# "), f"{file.name} should open with a comment saying what it is"
        OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.load(file))  # unknown keys raise


def test_render_prompt_with_and_without_the_chat_template(toy_tokenizer) -> None:
    prompt = BenchPrompt(id="x", category="toy-code", turns=["def add(a, b):\n    return a + b\n"], system="Be brief.")
    ids = render_prompt(toy_tokenizer, prompt, chat_template=True)
    assert all(isinstance(i, int) for i in ids)
    text = toy_tokenizer.decode(ids)
    assert prompt.turns[0] in text and "Be brief." in text and text.endswith(ASSISTANT)
    plain = render_prompt(toy_tokenizer, prompt, chat_template=False)
    assert toy_tokenizer.decode(plain) == prompt.turns[0]
