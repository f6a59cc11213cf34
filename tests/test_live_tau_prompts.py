"""τ during training decodes from real prefixes: a chat record's turns before its first trained token, a text
record's own opening (issue 18: a text record gave a 1-token prompt, so val_tau measured unconditional generation:
5.25 in training against 2.30 by `specdistill eval` on held-out prompts)."""

from __future__ import annotations

import torch

from specdistill.data_prep.chat import tokenize_conversation, tokenize_text
from specdistill.distill.decoding import DecodingConfig
from specdistill.train.live_tau import tau_counts_size, tau_metrics, validation_prompts

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"


def text_record(tokenizer, text: str) -> dict:
    input_ids, loss_mask = tokenize_text(tokenizer, text)
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def chat_record(tokenizer, user: str, assistant: str) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    input_ids, loss_mask = tokenize_conversation(tokenizer, messages, set(tokenizer.all_special_ids))
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def test_a_text_record_is_prompted_with_its_first_half(toy_tokenizer):
    record = text_record(toy_tokenizer, CODE * 2)
    assert record["loss_mask"][:2] == [0, 1]  # as prep writes it: trained from the second token
    [prompt] = validation_prompts([record], 1)
    assert prompt == record["input_ids"][: len(record["input_ids"]) // 2]  # a real prefix, not the first token alone


def test_a_long_text_record_prompt_is_capped(toy_tokenizer):
    from specdistill.train.live_tau import MAX_PREFIX_TOKENS

    record = text_record(toy_tokenizer, CODE * 200)
    assert len(record["input_ids"]) > 2 * MAX_PREFIX_TOKENS
    assert validation_prompts([record], 1) == [record["input_ids"][:MAX_PREFIX_TOKENS]]


def test_a_chat_record_keeps_the_turns_before_its_first_assistant_token(toy_tokenizer):
    for user in ("hi", "Write a function that adds two numbers, in Python please."):
        record = chat_record(toy_tokenizer, user, "def add(a, b):\n    return a + b")
        first = record["loss_mask"].index(1)
        assert validation_prompts([record], 1) == [record["input_ids"][:first]]


def test_records_too_short_for_a_real_prefix_are_left_out(toy_tokenizer):
    short = text_record(toy_tokenizer, "x = 1")
    chat = chat_record(toy_tokenizer, "hi", "ok")
    assert validation_prompts([short, chat, chat], 2) == [chat["input_ids"][: chat["loss_mask"].index(1)]] * 2


def test_tau_counts_are_laid_out_by_the_configured_draft_depth():
    """[committed, steps, reached_1..D, accepted_1..D] with D from train.tau (here a tree of depth 2), not recovered
    from the tensor's length."""
    tree = DecodingConfig(method="tree", tree_depth=2)
    assert tau_counts_size(tree) == 6 and tau_counts_size(DecodingConfig(gamma=3)) == 8
    counts = torch.tensor([9.0, 4.0, 4.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    assert tau_metrics(counts, tree) == {"val_tau": 2.25, "val_alpha_pos1": 0.75, "val_alpha_pos2": 0.5}
