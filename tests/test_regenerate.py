"""`data.regenerate=true`: assistant turns become the target's own replies, batched, and resumable."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from specdistill.data_prep.chat import render
from specdistill.data_prep.readers import parse_record
from specdistill.data_prep.regenerate import regenerate_conversations
from specdistill.distill.toy import toy_chat_conversations
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def toy_model(toy_tiny_path: Path):
    return AutoModelForCausalLM.from_pretrained(toy_tiny_path).eval()


def conversations(count: int) -> dict:
    records = toy_chat_conversations(split="chat", seed=0)
    multi_turn = [r for r in records if sum(m["role"] == "assistant" for m in r["messages"]) > 1][:2]
    return {index: parse_record(record, "messages") for index, record in enumerate(records[:count] + multi_turn)}


def regen_cfg(**overrides):
    return OmegaConf.create({"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12, "batch_size": 3, **overrides})


def test_greedy_regeneration_equals_the_targets_own_greedy_reply(toy_model, toy_tokenizer, tmp_path: Path):
    originals = conversations(4)
    regenerated = copy.deepcopy(originals)
    counts = regenerate_conversations(regenerated, toy_model, toy_tokenizer, regen_cfg(), tmp_path / "p.jsonl", 0)
    total_turns = sum(sum(m["role"] == "assistant" for m in c.messages) for c in originals.values())
    assert len(originals) <= counts["turns_regenerated"] <= total_turns  # every first turn, later ones unless cut
    compared = 0
    for index, conversation in regenerated.items():
        original = originals[index].messages
        kept = original[: len(conversation.messages)]
        assert [m["role"] for m in conversation.messages] == [m["role"] for m in kept]
        assert [m for m in conversation.messages if m["role"] != "assistant"] == [
            m for m in kept if m["role"] != "assistant"
        ]  # only assistant turns change
        replies = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
        if not replies:  # the target's first reply was empty: the conversation was cut before it
            continue
        # one prompt alone, no batching or padding: the reply must be the same
        prompt = render(toy_tokenizer, conversation.messages[: replies[0]], add_generation_prompt=True)
        ids = toy_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = toy_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=toy_tokenizer.pad_token_id)
        expected = toy_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert conversation.messages[replies[0]]["content"] == expected
        assert expected != original[replies[0]]["content"]  # the data really changed
        compared += 1
    assert compared >= len(originals) // 2


def test_interrupted_sampling_run_resumes_to_the_same_data(toy_model, toy_tokenizer, tmp_path: Path):
    cfg = regen_cfg(temperature=0.9, top_p=0.95)
    whole = conversations(5)
    regenerate_conversations(whole, toy_model, toy_tokenizer, cfg, tmp_path / "whole.jsonl", seed=7)

    # keep the first batch of a run, as if it had been killed after it, then run again on the same file
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "resumed.jsonl").write_text("".join(lines[:3]) + '{"record": 9, "tu')  # a torn last line
    resumed = conversations(5)
    counts = regenerate_conversations(resumed, toy_model, toy_tokenizer, cfg, tmp_path / "resumed.jsonl", seed=7)
    assert counts["turns_resumed"] >= 3 and counts["turns_regenerated"] == len(lines) - 3
    assert {i: c.messages for i, c in resumed.items()} == {i: c.messages for i, c in whole.items()}


def test_prep_cli_regenerates(tmp_path: Path, cache_dir: Path):
    records = toy_chat_conversations(split="chat", seed=0)[:4]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = run_cli("prep", "target=toy_tiny", "data=local", f"data.path={path}", "data.regenerate=true",
                     "data.regen.max_new_tokens=8", "data.regen.batch_size=2", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())
    turns = sum(m["role"] == "assistant" for r in records for m in r["messages"])
    assert stats["regenerated"]["turns_regenerated"] == turns
    assert len((tmp_path / "out" / "regenerated.jsonl").read_text().splitlines()) == turns
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert sum(len(split) for split in dataset.values()) == stats["records_kept"] > 0
