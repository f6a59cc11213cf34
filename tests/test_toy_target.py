"""Tests of the toy target builder (distill/toy.py): data splits, conversations, build and cache."""

import json
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdistill.distill import toy
from specdistill.distill.config import DType, ToyTarget
from tests.conftest import compose
from specdistill.distill.toy import (
    END_OF_TURN,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    ToyTargetConfig,
    build_settings,
    ensure_toy_target,
    render_chat,
    stdlib_source_files,
    toy_chat_conversations,
    toy_split,
    toy_target_cache_key,
)

TINY: ToyTarget = OmegaConf.to_object(compose("prep", ["target=toy_tiny", "out_dir=unused"]).target.toy)
EXPECTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "build_info.json",
]


@pytest.fixture(scope="module")
def tiny_target(cache_dir) -> Path:
    return ensure_toy_target(TINY, cache_dir)


@pytest.fixture(scope="module")
def build_info(tiny_target) -> dict:
    return json.loads((tiny_target / "build_info.json").read_text())


# --- data ---------------------------------------------------------------------


def test_stdlib_source_files_sorted_python_sources():
    files = stdlib_source_files()
    assert len(files) > 500
    assert files == sorted(files)
    for rel, path in files:
        assert rel.endswith(".py") and "site-packages" not in rel and "\\" not in rel
        assert path.is_absolute() and path.as_posix().endswith(rel)


def test_toy_split_deterministic_and_all_splits_used():
    rels = [rel for rel, _ in stdlib_source_files()]
    splits = [toy_split(rel) for rel in rels]
    assert splits == [toy_split(rel) for rel in rels]
    counts = {name: splits.count(name) for name in ("target", "chat", "bench")}
    assert sum(counts.values()) == len(rels)
    assert counts["target"] > counts["chat"] > counts["bench"] > 0


def test_toy_chat_conversations_shape():
    conversations = toy_chat_conversations("chat", seed=0)
    assert conversations == toy_chat_conversations("chat", seed=0)
    assert len(conversations) >= 1000
    for conv in conversations:
        messages = conv["messages"]
        roles = [m["role"] for m in messages]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns[0::2] == ["user"] * len(turns[0::2])
        assert turns[1::2] == ["assistant"] * len(turns[1::2])
        assert turns[-1] == "assistant"
        assert all(m["content"].strip() for m in messages)
        # Byte-level BPE makes at most one token per byte: this bounds the token count.
        assert sum(len(m["content"].encode()) for m in messages) < 1400
    assert any(c["messages"][0]["role"] == "system" for c in conversations)
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in conversations)


def test_toy_chat_conversations_cap_and_seed():
    first = toy_chat_conversations("bench", seed=0, max_conversations=10)
    assert len(first) == 10
    assert first == toy_chat_conversations("bench", seed=0)[:10]
    assert first != toy_chat_conversations("bench", seed=1, max_conversations=10)


# --- cache key and cache mechanics (no real build) ------------------------------


def test_cache_key_depends_on_every_setting():
    key = toy_target_cache_key(TINY)
    assert key == toy_target_cache_key(replace(TINY))
    assert re.fullmatch(r"[0-9a-f]{16}", key), key  # 16 hex digits: the folder name under toy_target/
    assert toy_target_cache_key(replace(TINY, seed=1)) != key
    assert toy_target_cache_key(replace(TINY, lr=TINY.lr * 2)) != key
    assert toy_target_cache_key(ToyTargetConfig()) != key


def test_cache_key_ignores_the_presets_loading_values():
    # name and dtype say how the built toy is used, not how it is built: no rebuild when they change
    loading_changed = replace(TINY, name="other", dtype=DType.bfloat16)
    assert toy_target_cache_key(loading_changed) == toy_target_cache_key(TINY)
    assert set(build_settings(TINY)) == set(vars(ToyTargetConfig()))


def _fake_build(calls: list, delay: float = 0.0):
    def build(cfg, out_dir):
        calls.append(cfg)
        time.sleep(delay)
        (Path(out_dir) / "build_info.json").write_text("{}")
        return {}

    return build


def test_concurrent_ensure_builds_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(toy, "build_toy_target", _fake_build(calls, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_toy_target(TINY, tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results[0] == results[1] == tmp_path / "toy_target" / toy_target_cache_key(TINY)
    assert (results[0] / "build_info.json").exists()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_build(cfg, out_dir):
        (Path(out_dir) / "partial.bin").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(toy, "build_toy_target", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_toy_target(TINY, tmp_path)
    leftovers = [p.name for p in (tmp_path / "toy_target").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# --- the real tiny build --------------------------------------------------------


def test_build_folder_layout(tiny_target, cache_dir, build_info):
    assert tiny_target == cache_dir / "toy_target" / toy_target_cache_key(TINY)
    for name in EXPECTED_FILES:
        assert (tiny_target / name).is_file(), name
    # the folder is shared by test sessions (conftest.py), so other builds may sit beside it; none of this key's
    # staging leftovers may
    siblings = {p.name for p in tiny_target.parent.iterdir() if tiny_target.name in p.name}
    assert siblings == {tiny_target.name, f"{tiny_target.name}.lock"}
    assert build_info["key"] == tiny_target.name
    assert build_info["config"] == build_settings(TINY)
    assert build_info["steps"] == TINY.steps
    assert build_info["tokens_trained"] == TINY.steps * TINY.batch_size * TINY.seq_len
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    assert build_info["num_parameters"] == sum(parameter.numel() for parameter in model.parameters())


def test_model_learned_beyond_unigram(build_info):
    assert build_info["heldout_loss"] < build_info["unigram_loss"] - 1.0


def test_loads_with_auto_classes_and_chat_template(tiny_target):
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert tokenizer.eos_token == END_OF_TURN and tokenizer.pad_token == ENDOFTEXT
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    eos_ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    assert list(model.generation_config.eos_token_id) == eos_ids

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "Continue."},
    ]
    expected = (
        "<|system|>Be brief.<|end|>\n<|user|>def add(a, b):<|end|>\n"
        "<|assistant|>    return a + b<|end|>\n<|user|>Continue.<|end|>\n<|assistant|>"
    )
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected == render_chat(messages, add_generation_prompt=True)
    assert tokenizer.decode(tokenizer.encode(rendered, add_special_tokens=False)) == rendered

    prompt = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_second_ensure_reuses_cached_build(tiny_target, cache_dir, monkeypatch):
    info_file = tiny_target / "build_info.json"
    mtime = info_file.stat().st_mtime_ns

    def no_build(cfg, out_dir):
        raise AssertionError("ensure_toy_target rebuilt a target that is in the cache")

    monkeypatch.setattr(toy, "build_toy_target", no_build)
    assert ensure_toy_target(TINY, cache_dir) == tiny_target
    assert info_file.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_build_is_deterministic(tiny_target, tmp_path):
    again = ensure_toy_target(TINY, tmp_path)
    assert (again / "tokenizer.json").read_text() == (tiny_target / "tokenizer.json").read_text()
    first = AutoModelForCausalLM.from_pretrained(tiny_target).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_lr_schedule_is_the_one_train_uses_warm_up_then_cosine_to_its_floor():
    """distill/schedule.py's `lr_factor`, shared by the toy build (floor 0.1) and `specdistill train`."""
    from specdistill.distill.schedule import lr_factor

    factors = [lr_factor(step, 2, 10, "cosine", floor=0.1) for step in (0, 1, 2, 6, 10, 12)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert [lr_factor(step, 0, 4, "linear") for step in (0, 2, 4)] == [1.0, 0.5, 0.0]
    assert lr_factor(7, 2, 4, "constant") == 1.0


@pytest.mark.parametrize("change, key", [
    (dict(vocab_size=100), r"^target\.toy\.vocab_size: 100 is below the \d+ tokens .* at least \d+$"),
    (dict(seq_len=1_000_000), r"^target\.toy: .* raise target\.toy\.max_corpus_chars or lower target\.toy\.seq_len"),
])
def test_unbuildable_toy_settings_name_the_key(change, key, tmp_path):
    """A build setting the toy cannot be built with is the user's to fix: a UserError naming the key, before training,
    and nothing left in the cache."""
    from specdistill.distill.errors import UserError

    with pytest.raises(UserError, match=key):
        ensure_toy_target(replace(TINY, max_corpus_chars=20_000, **change), tmp_path)
    assert [p.name for p in (tmp_path / "toy_target").iterdir() if not p.name.endswith(".lock")] == []
