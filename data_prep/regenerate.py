"""Replace assistant turns with the target's own responses, so the drafter learns the distribution it will serve.

Turn by turn (the k-th assistant reply of every conversation needs the regenerated replies before it), prompts are
batched, left-padded and sampled with `data.regen` settings. Every finished batch is appended to a progress file
(`regenerated.jsonl`, one line per reply) and flushed, so an interrupted run started again with the same `out_dir`
skips what is done. A batch's sampling seed depends only on its contents, so a resumed run gives the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from specdistill.data_prep.chat import render
from specdistill.data_prep.readers import Conversation


def _assistant_positions(messages: list[dict[str, str]]) -> list[int]:
    return [index for index, message in enumerate(messages) if message["role"] == "assistant"]


def _load_progress(progress_path: Path) -> dict[tuple[int, int], str]:
    done: dict[tuple[int, int], str] = {}
    if progress_path.exists():
        with progress_path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run killed mid-write
                done[(entry["record"], entry["turn"])] = entry["content"]
    return done


def _batch_seed(seed: int, keys: list[tuple[int, int]]) -> int:
    digest = hashlib.sha256(json.dumps([seed, keys]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


@torch.inference_mode()
def _generate(model: Any, tokenizer: Any, prompts: list[str], regen_cfg: Any, seed: int) -> list[str]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = regen_cfg.temperature > 0
    torch.manual_seed(seed)
    output = model.generate(
        **batch,
        max_new_tokens=regen_cfg.max_new_tokens,
        do_sample=sampling,
        temperature=regen_cfg.temperature if sampling else None,
        top_p=regen_cfg.top_p if sampling else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def regenerate_conversations(
    conversations: dict[int, Conversation],
    model: Any,
    tokenizer: Any,
    regen_cfg: Any,
    progress_path: Path,
    seed: int,
) -> dict[str, int]:
    """Replace, in place, every assistant turn of `conversations` (record index → conversation) with the target's
    response to the turns before it. A conversation whose regenerated reply is empty is cut before that turn.
    Returns counts for the statistics."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    done = _load_progress(progress_path)
    resumed = len(done)
    positions = {record: _assistant_positions(conv.messages) for record, conv in conversations.items()}
    total = sum(len(turns) for turns in positions.values())
    counts = {"turns_regenerated": 0, "turns_resumed": 0, "empty_replies": 0}
    progress_path.parent.mkdir(parents=True, exist_ok=True)
    with progress_path.open("a", encoding="utf-8") as progress, tqdm(
        total=total, desc="regenerate", unit="turn", initial=min(resumed, total)
    ) as bar:
        for turn in range(max((len(turns) for turns in positions.values()), default=0)):
            pending = [(record, turn) for record, turns in positions.items() if turn < len(turns)]
            for record, _ in pending:  # apply replies finished by an earlier run
                if (record, turn) in done:
                    conversations[record].messages[positions[record][turn]]["content"] = done[(record, turn)]
                    counts["turns_resumed"] += 1
            todo = [key for key in pending if key not in done]
            for start in range(0, len(todo), regen_cfg.batch_size):
                keys = todo[start : start + regen_cfg.batch_size]
                prompts = [
                    render(tokenizer, conversations[record].messages[: positions[record][turn]], add_generation_prompt=True)
                    for record, turn in keys
                ]
                replies = _generate(model, tokenizer, prompts, regen_cfg, _batch_seed(seed, keys))
                for (record, turn), reply in zip(keys, replies):
                    conversations[record].messages[positions[record][turn]]["content"] = reply
                    progress.write(json.dumps({"record": record, "turn": turn, "content": reply}) + "\n")
                progress.flush()
                os.fsync(progress.fileno())
                counts["turns_regenerated"] += len(keys)
                bar.update(len(keys))
            for record, _ in pending:  # an empty reply ends the conversation before that turn
                messages = conversations[record].messages
                cut = positions[record][turn]
                if not messages[cut]["content"]:
                    counts["empty_replies"] += 1
                    del messages[cut:]
                    positions[record] = positions[record][:turn]
    return counts
