"""Regeneration's batched decode loop (data_prep/regenerate.py): greedy replies equal transformers' `generate`, rows
stop at EOS and leave the batch, and a resumed run leaves finished replies alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from specdistill.data_prep.chat import render
from specdistill.data_prep.config import RegenerateConfig
from specdistill.data_prep.readers import parse_record
from specdistill.data_prep.regenerate import ReplyGenerator, generate_with_transformers, regenerate_conversations
from specdistill.distill.targets import eos_token_ids
from specdistill.distill.toy import toy_chat_conversations


@pytest.fixture(scope="module")
def toy_model(toy_tiny_path: Path):
    return AutoModelForCausalLM.from_pretrained(toy_tiny_path).eval()


def regen_cfg(**overrides) -> RegenerateConfig:
    return RegenerateConfig(**{"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 24, "batch_size": 4, **overrides})


def prompts_of_different_lengths(tokenizer, replier: ReplyGenerator, count: int = 5) -> list[list[int]]:
    """First user turns of the toy chat data, each cut to a different length (so the batch is padded)."""
    records = toy_chat_conversations(split="chat", seed=0)[:count]
    prompts = []
    for index, record in enumerate(records):
        messages = [m for m in record["messages"] if m["role"] != "assistant"][:2]
        messages[-1] = {**messages[-1], "content": messages[-1]["content"][: 40 + 60 * index]}
        prompts.append(replier.token_ids(render(tokenizer, messages, add_generation_prompt=True)))
    assert len({len(prompt) for prompt in prompts}) == count
    return prompts


def batched(replier: ReplyGenerator, prompts: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[int]]:
    """Our loop's replies to one batch, in prompt order, and the order they ended in."""
    ended = list(replier.batched.generate(prompts, seeds))
    return [reply for _, reply in sorted(ended)], [index for index, _ in ended]


def test_greedy_batched_replies_equal_transformers_generate(toy_model, toy_tokenizer):
    cfg = regen_cfg()
    replier = ReplyGenerator(toy_model, toy_tokenizer, cfg)
    assert replier.batched is not None  # the toy is a Llama: our loop, not `generate`
    prompts = prompts_of_different_lengths(toy_tokenizer, replier)
    ours, ended = batched(replier, prompts, seeds=[0] * len(prompts))
    assert ended != sorted(ended), "replies ended in prompt order: rows leaving the batch are untested"
    eos = eos_token_ids(toy_tokenizer, toy_model)
    for prompt, reply in zip(prompts, ours):  # each prompt alone through `generate`: no padding at all
        alone = generate_with_transformers(toy_model, [prompt], replier.pad_id, cfg, seed=0)[0]
        assert reply == alone and (len(reply) == cfg.max_new_tokens or reply[-1] in eos)
        assert all(token not in eos for token in reply[:-1])  # a row stops at its first EOS
    padded = generate_with_transformers(toy_model, prompts, replier.pad_id, cfg, seed=0)  # one left-padded batch
    assert [reply == hf[: len(reply)] for reply, hf in zip(ours, padded)] == [True] * len(prompts)


def test_a_sampled_reply_depends_on_its_seed_not_on_its_batch(toy_model, toy_tokenizer):
    replier = ReplyGenerator(toy_model, toy_tokenizer, regen_cfg(temperature=0.9, top_p=0.9))
    prompts = prompts_of_different_lengths(toy_tokenizer, replier, count=4)
    first = batched(replier, prompts, seeds=[1, 2, 3, 4])[0]
    assert first == batched(replier, prompts, seeds=[1, 2, 3, 4])[0]
    assert first[1:] == batched(replier, prompts[1:], seeds=[2, 3, 4])[0]  # other rows beside them
    assert first[2:] == batched(replier, prompts[2:][::-1], seeds=[4, 3])[0][::-1]
    assert first != batched(replier, prompts, seeds=[5, 6, 7, 8])[0]


def conversations(count: int) -> dict:
    records = toy_chat_conversations(split="chat", seed=1)[:count]
    return {index: parse_record(record, "messages") for index, record in enumerate(records)}


def test_a_resumed_run_regenerates_only_unfinished_replies(toy_model, toy_tokenizer, tmp_path: Path):
    cfg = regen_cfg(max_new_tokens=8, batch_size=2)
    whole = conversations(6)
    progress = tmp_path / "whole.jsonl"
    regenerate_conversations(whole, toy_model, toy_tokenizer, cfg, progress, seed=0)
    lines = progress.read_text().splitlines()

    # keep the first 4 replies that ended, marked: a resumed run must take them as they are and redo only the rest
    kept = [line.replace('"content": "', '"content": "KEPT ') for line in lines if '"turn": 0' in line][:4]
    resumed_path = tmp_path / "resumed.jsonl"
    resumed_path.write_text("\n".join(kept) + "\n")
    resumed = conversations(6)
    _, counts = regenerate_conversations(resumed, toy_model, toy_tokenizer, cfg, resumed_path, seed=0)
    assert counts["turns_resumed"] == 4 and counts["turns_regenerated"] == len(lines) - 4
    marked = {index for index, conv in resumed.items() if any(m["content"].startswith("KEPT ") for m in conv.messages)}
    assert len(marked) == 4
    assert ({index: conv.messages for index, conv in resumed.items() if index not in marked}
            == {index: conv.messages for index, conv in whole.items() if index not in marked})
