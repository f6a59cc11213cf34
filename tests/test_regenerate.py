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
from specdistill.data_prep.config import DataConfig, RegenerateConfig
from specdistill.data_prep.prep import check_regen
from specdistill.data_prep.regenerate import regenerate_conversations
from specdistill.distill.errors import UserError
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
    return OmegaConf.structured(RegenerateConfig(**{"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12,
                                                    "batch_size": 3, **overrides}))


def test_greedy_regeneration_equals_the_targets_own_greedy_reply(toy_model, toy_tokenizer, tmp_path: Path):
    originals = conversations(4)
    regenerated = copy.deepcopy(originals)
    _, counts = regenerate_conversations(regenerated, toy_model, toy_tokenizer, regen_cfg(), tmp_path / "p.jsonl", 0)
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
    _, counts = regenerate_conversations(resumed, toy_model, toy_tokenizer, cfg, tmp_path / "resumed.jsonl", seed=7)
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


def test_more_samples_add_replies_and_leave_sample_zero_as_a_single_sample_run(toy_model, toy_tokenizer,
                                                                              tmp_path: Path):
    cfg = regen_cfg(temperature=0.9, top_p=0.95)
    single = conversations(4)
    regenerate_conversations(single, toy_model, toy_tokenizer, cfg, tmp_path / "single.jsonl", seed=3)
    progress = tmp_path / "samples.jsonl"
    two = regen_cfg(temperature=0.9, top_p=0.95, samples=2)
    given = conversations(4)
    (first, second), counts = regenerate_conversations(given, toy_model, toy_tokenizer, two, progress, seed=3)
    assert second is given  # the last sample is written in place, the others into copies
    assert counts["turns_regenerated"] == len(progress.read_text().splitlines()) > 0
    assert {i: c.messages for i, c in first.items()} == {i: c.messages for i, c in single.items()}
    assert {i: c.messages for i, c in second.items()} != {i: c.messages for i, c in first.items()}  # new draws
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert {line.get("sample", 0) for line in lines} == {0, 1}
    # a run killed in sample 1 resumes from the shared progress file: it redoes only sample 1's missing replies
    sample_one = [index for index, line in enumerate(lines) if line.get("sample") == 1]
    kept = progress.read_text().splitlines(keepends=True)[: sample_one[2]]
    progress.write_text("".join(kept))
    (again_first, again_second), counts = regenerate_conversations(conversations(4), toy_model, toy_tokenizer, two,
                                                                   progress, seed=3)
    assert counts["turns_regenerated"] == len(sample_one) - 2
    assert counts["turns_resumed"] == len(lines) - len(sample_one) + 2
    assert {i: c.messages for i, c in again_first.items()} == {i: c.messages for i, c in first.items()}
    assert {i: c.messages for i, c in again_second.items()} == {i: c.messages for i, c in second.items()}


def test_prep_cli_samples_replies_and_keeps_each_prompts_samples_in_one_split(tmp_path: Path, cache_dir: Path):
    records = toy_chat_conversations(split="chat", seed=0)[:10]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    common = ["target=toy_tiny", "data=local", f"data.path={path}", "data.regenerate=true",
              "data.regen.max_new_tokens=8", "data.regen.batch_size=4", "data.validation_fraction=0.3"]
    result = run_cli("prep", *common, "data.regen.samples=3", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(3 sampled replies each)" in result.stdout
    stats = json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())
    assert stats["replies_per_record"] == 3 and stats["records_kept"] == 3 * len(records)
    assert (stats["train_records"], stats["validation_records"]) == (21, 9)
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    user_turns = {}  # the rows' tokens before their first trained token: the prompt each was sampled for
    for split in ("train", "validation"):
        for row in dataset[split]:
            user_turns.setdefault(split, []).append(tuple(row["input_ids"][: row["loss_mask"].index(1)]))
    assert not set(user_turns["train"]) & set(user_turns["validation"])
    assert all(user_turns[split].count(prompt) == 3 for split in user_turns for prompt in user_turns[split])
    # one sample is the single-sample prep, split and all
    result = run_cli("prep", *common, f"out_dir={tmp_path}/one", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    one = datasets.load_from_disk(str(tmp_path / "one" / "dataset"))
    single_validation = {tuple(row["input_ids"][: row["loss_mask"].index(1)]) for row in one["validation"]}
    assert single_validation == set(user_turns["validation"])


@pytest.mark.parametrize("settings, named", [
    ({"regen": {"samples": 2}}, "set data.regenerate=true"),
    ({"regenerate": True, "regen": {"samples": 2, "temperature": 0.0}}, "greedy replies are all the same"),
    ({"regenerate": True, "regen": {"samples": 0}}, "data.regen.samples=0"),
    ({"regen": {"follow_ups": 1}}, "set data.regenerate=true"),
    ({"regenerate": True, "regen": {"follow_ups": -1}}, "data.regen.follow_ups=-1"),
    ({"regenerate": True, "regen": {"follow_ups": 1, "follow_up_questions": [" "]}}, "empty data.regen.follow_up_"),
])
def test_prep_refuses_regeneration_settings_it_would_ignore(settings, named):
    data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig(path="chats.jsonl")), settings)
    with pytest.raises(UserError, match=named):
        check_regen(data_cfg)
    check_regen(OmegaConf.structured(DataConfig(path="chats.jsonl", regenerate=True)))  # the default: one reply


def test_follow_ups_are_asked_after_the_reply_and_answered_by_the_target(toy_model, toy_tokenizer, tmp_path: Path):
    """data.regen.follow_ups=1: every conversation ending with a reply gets one drawn follow-up and the target's
    answer to it; the first turns are resumed from a run without follow-ups (same keys, same seeds)."""
    single = {index: conv for index, conv in conversations(6).items()
              if sum(m["role"] == "assistant" for m in conv.messages) == 1}
    progress = tmp_path / "p.jsonl"
    first, _ = regenerate_conversations(copy.deepcopy(single), toy_model, toy_tokenizer, regen_cfg(), progress, 0)
    questions = ["Shorter, please.", "Give an example.", "Why?"]
    cfg = regen_cfg(follow_ups=1, follow_up_questions=questions)
    [followed], counts = regenerate_conversations(copy.deepcopy(single), toy_model, toy_tokenizer, cfg, progress, 0)
    assert counts["follow_ups_added"] == len(single) and counts["turns_resumed"] == len(single)
    for index, conversation in followed.items():
        messages, first_turn = conversation.messages, first[0][index].messages
        assert messages[: len(first_turn)] == first_turn  # the resumed first reply, unchanged
        if len(first_turn) < len(single[index].messages):  # the first reply was empty: cut, no follow-up answered
            continue
        assert [m["role"] for m in messages[-3:]] == ["assistant", "user", "assistant"]
        assert messages[-2]["content"] in questions
        # the follow-up's answer is the target's greedy reply to everything before it
        prompt = render(toy_tokenizer, messages[:-1], add_generation_prompt=True)
        ids = toy_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = toy_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=toy_tokenizer.pad_token_id)
        assert messages[-1]["content"] == toy_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # the same seed draws the same questions
    again, _ = regenerate_conversations(copy.deepcopy(single), toy_model, toy_tokenizer, cfg, tmp_path / "q.jsonl", 0)
    asked = [c.messages[2]["content"] for c in followed.values() if len(c.messages) > 2]
    assert asked == [c.messages[2]["content"] for c in again[0].values() if len(c.messages) > 2]
