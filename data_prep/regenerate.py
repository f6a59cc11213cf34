"""Replace assistant turns with the target's own responses, so the drafter learns the distribution it will serve.

Turn by turn (the k-th assistant reply of every conversation needs the regenerated replies before it), the prompts
are sorted by length (rows that decode together pad little) and decoded with the `data.regen` settings. Every reply
is appended to a progress file (`regenerated.jsonl`, one line per reply, keyed by record and turn) as it ends, so
an interrupted run started again with the same `out_dir` skips what is done. A reply's sampling seed depends only on
the run's seed and its key, so a resumed run gives the same data (up to the rounding of other batch shapes).
`data.regen.samples` > 1 samples that many replies per conversation, one pass over the conversations each, with one
copy of the target's weights and one read of the progress file (the progress lines of sample s > 0 carry
`"sample": s`; sample 0's seeds and lines are those of a single-sample run). `data.regen.follow_ups` appends follow-up
user turns (drawn from `data.regen.follow_up_questions` by the seed and the record) before regenerating, so their
answers are regenerated after the replies before them like any later turn; their keys are later turns, so the first
replies of a run without follow-ups are resumed unchanged.

Decoding runs our own batched loop on distill/lean.py's forward (Llama-family targets), `data.regen.batch_size`
prompts a batch, left-padded; a row leaves the batch at its first EOS (the tokenizer's and the generation config's),
so it costs nothing while the longer replies go on. On 2 CPU cores with SmolLM2-135M in fp32 it measured about 2×
transformers' `generate` at batch sizes 1 to 32 (BENCHMARKS.md, "Regeneration speed"). Other architectures go
through `generate`, each batch seeded by its keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import torch
from tqdm.auto import tqdm

from specdistill.data_prep.chat import render
from specdistill.data_prep.readers import Conversation
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.lean import LeanCausalLM, lean_causal_lm
from specdistill.distill.targets import eos_token_ids
from specdistill.distill.verification import target_probs


Key = tuple[int, int]  # (record index, assistant turn)


def _assistant_positions(messages: list[dict[str, str]]) -> list[int]:
    return [index for index, message in enumerate(messages) if message["role"] == "assistant"]


def _load_progress(progress_path: Path) -> dict[int, dict[Key, str]]:
    """sample → the replies of it an earlier run finished."""
    done: dict[int, dict[Key, str]] = {}
    if progress_path.exists():
        with progress_path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run killed mid-write
                done.setdefault(entry.get("sample", 0), {})[(entry["record"], entry["turn"])] = entry["content"]
    return done


def _seed(seed: int, keys: Any) -> int:
    """A sampling seed from the run's seed and what is sampled (a reply's key, or a batch's keys)."""
    digest = hashlib.sha256(json.dumps([seed, keys]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


def _left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] token ids with the padding on the left, and the mask of real tokens."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        valid[row, width - len(prompt) :] = True
    return input_ids.to(device), valid.to(device)


@dataclass
class _Rows:
    """The prompts decoding together: row r is prompt `index[r]`, with the real-token mask of its cache columns
    (`valid`), the position of its next token and the logits its next token is chosen from."""

    index: list[int]
    cache: KVCache
    valid: torch.Tensor  # [rows, columns] bool
    next_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]

    def keep(self, keep: torch.Tensor) -> "_Rows | None":
        """Only the rows `keep` marks (a copy of their cache), or None when none is left."""
        if not keep.any():
            return None
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        kept = keep.tolist()
        return _Rows([index for index, kept_row in zip(self.index, kept) if kept_row], self.cache, self.valid[keep],
                     self.next_position[keep], self.logits[keep])


class BatchedGenerator:
    """Greedy or (temperature, top-p) sampled replies to a batch of prompts on the lean forward of a Llama-family
    target. A row leaves the batch at its first EOS (or after max_new_tokens), so it costs nothing while the longer
    replies go on. Each reply samples from its own generator: it depends on its seed, not on the prompts beside it."""

    def __init__(self, lean: LeanCausalLM, eos_ids: set[int], pad_id: int, regen_cfg: Any, device: torch.device):
        self.lean, self.pad_id, self.regen_cfg, self.device = lean, pad_id, regen_cfg, device
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

    def _choose(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Each row's argmax, or its sample: the first token whose cumulative probability exceeds its own uniform
        draw (inverse CDF; a token of probability 0 is never chosen)."""
        if self.regen_cfg.temperature <= 0:
            return logits.argmax(dim=-1)
        cumulative = target_probs(logits, self.regen_cfg.temperature, self.regen_cfg.top_p).cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=generator) for generator in generators]).to(self.device)
        return torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True).squeeze(1)

    def _prefill(self, prompts: list[list[int]]) -> _Rows:
        input_ids, valid = _left_padded(prompts, self.pad_id, self.device)
        width = input_ids.shape[1]
        cache = KVCache(capacity=width + self.regen_cfg.max_new_tokens)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        # a padding row attends to itself only: a row with nothing visible would give NaN (and is never read)
        mask = causal & (valid[:, None, :] | torch.eye(width, dtype=torch.bool, device=self.device))
        logits = self.lean(input_ids, positions, cache, mask[:, None], last_logits_only=True).logits[:, -1]
        return _Rows(list(range(len(prompts))), cache, valid, valid.sum(dim=1), logits)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int]) -> Iterator[tuple[int, list[int]]]:
        """(prompt index, the new token ids of its reply through its first EOS token, or max_new_tokens of them), as
        each reply ends; all `prompts` decode as one batch."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        replies: list[list[int]] = [[] for _ in prompts]
        running: _Rows | None = self._prefill(prompts)
        while running is not None:
            tokens = self._choose(running.logits, [generators[i] for i in running.index])
            finished = torch.isin(tokens, self.eos_ids)
            for row, (index, token) in enumerate(zip(running.index, tokens.tolist())):
                replies[index].append(token)
                if len(replies[index]) == self.regen_cfg.max_new_tokens:
                    finished[row] = True
            for index in (index for index, done in zip(running.index, finished.tolist()) if done):
                yield index, replies[index]
            if finished.any():  # finished rows leave the batch (and the cache): they cost nothing from here on
                running, tokens = running.keep(~finished), tokens[~finished]
                if running is None:
                    break
            running.valid = torch.cat([running.valid, running.valid.new_ones(len(running.index), 1)], dim=1)
            running.logits = self.lean(tokens[:, None], running.next_position[:, None], running.cache,
                                       running.valid[:, None, None, :]).logits[:, -1]
            running.next_position = running.next_position + 1


@torch.inference_mode()
def generate_with_transformers(
    model: Any, prompts: list[list[int]], pad_id: int, regen_cfg: Any, seed: int
) -> list[list[int]]:
    """transformers' `generate` on a left-padded batch: for targets the lean forward does not support."""
    input_ids, valid = _left_padded(prompts, pad_id, model.device)
    sampling = regen_cfg.temperature > 0
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=valid.long(),
        max_new_tokens=regen_cfg.max_new_tokens,
        do_sample=sampling,
        temperature=regen_cfg.temperature if sampling else None,
        top_p=regen_cfg.top_p if sampling else None,
        top_k=None,
        pad_token_id=pad_id,
    )
    return output[:, input_ids.shape[1] :].tolist()


class ReplyGenerator:
    """The target's replies (text) to rendered prompts: through our batched loop when the target supports it,
    otherwise through `generate` in batches of `regen_cfg.batch_size`."""

    def __init__(self, model: Any, tokenizer: Any, regen_cfg: Any):
        self.model, self.tokenizer, self.regen_cfg = model, tokenizer, regen_cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lean = lean_causal_lm(model)
        self.batched = None if lean is None else BatchedGenerator(
            lean, eos_token_ids(tokenizer, model), self.pad_id, regen_cfg, model.device
        )

    def token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template wrote any BOS

    def _text(self, new_tokens: list[int]) -> str:
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def replies(self, prompts: dict[Key, list[int]], order: list[Key], seed: int) -> Iterator[tuple[Key, str]]:
        """(key, reply) for every prompt, in batches of `regen_cfg.batch_size` taken in `order`, as replies end. A
        reply's sampling seed depends on `seed` and its key (through `generate`: on its batch's keys)."""
        for start in range(0, len(order), self.regen_cfg.batch_size):
            keys = order[start : start + self.regen_cfg.batch_size]
            batch = [prompts[key] for key in keys]
            if self.batched is not None:
                for index, new_tokens in self.batched.generate(batch, [_seed(seed, key) for key in keys]):
                    yield keys[index], self._text(new_tokens)
            else:
                new_tokens = generate_with_transformers(self.model, batch, self.pad_id, self.regen_cfg, _seed(seed, keys))
                yield from zip(keys, map(self._text, new_tokens))


def regenerate_conversations(
    conversations: dict[int, Conversation],
    model: Any,
    tokenizer: Any,
    regen_cfg: Any,
    progress_path: Path,
    seed: int,
) -> tuple[list[dict[int, Conversation]], dict[str, int]]:
    """Every assistant turn of `conversations` (record index → conversation) replaced with the target's response to
    the turns before it, once per `regen_cfg.samples`, each sample with its own seeds (sample 0's are a
    single-sample run's). The last sample is written into `conversations` in place, the others into copies. A
    conversation whose regenerated reply is empty is cut before that turn. Returns the samples, and counts for the
    statistics summed over them."""
    replier = ReplyGenerator(model, tokenizer, regen_cfg)
    done = _load_progress(progress_path)
    num_samples = regen_cfg.samples
    samples, counts = [], {"turns_regenerated": 0, "turns_resumed": 0, "empty_replies": 0}
    if regen_cfg.follow_ups:
        counts["follow_ups_added"] = add_follow_ups(conversations, regen_cfg.follow_ups,
                                                    list(regen_cfg.follow_up_questions), seed)
    progress_path.parent.mkdir(parents=True, exist_ok=True)
    with progress_path.open("a", encoding="utf-8") as progress:
        for sample in range(num_samples):
            sampled = conversations if sample == num_samples - 1 else copy.deepcopy(conversations)
            run_seed = seed if sample == 0 else _seed(seed, {"sample": sample})
            _regenerate_sample(sampled, replier, tokenizer, done.get(sample, {}), progress, run_seed, sample, counts)
            samples.append(sampled)
    return samples, counts


def add_follow_ups(conversations: dict[int, Conversation], count: int, questions: list[str], seed: int) -> int:
    """Append `count` (user follow-up, empty reply) pairs to every conversation that ends with a reply, in place;
    the n-th follow-up of record r is drawn from `questions` by (seed, r, n), so a rerun asks the same. The replies
    are regenerated after the turns before them like any other. Returns the number of follow-ups added."""
    questions = [question for question in questions if question.strip()]
    added = 0
    for record, conversation in conversations.items():
        if conversation.messages[-1]["role"] != "assistant":
            continue
        for number in range(count):
            question = questions[_seed(seed, {"follow_up": [record, number]}) % len(questions)]
            conversation.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            added += 1
    return added


def _regenerate_sample(conversations: dict[int, Conversation], replier: ReplyGenerator, tokenizer: Any,
                       done: dict[Key, str], progress: IO[str], run_seed: int, sample: int,
                       counts: dict[str, int]) -> None:
    """One sample's pass over `conversations`, turn by turn, in place; each reply appended to `progress`."""
    positions = {record: _assistant_positions(conv.messages) for record, conv in conversations.items()}
    total = sum(len(turns) for turns in positions.values())
    # the progress file may hold replies of records this run does not take (an earlier run with more records)
    resumed = sum((record, turn) in done for record, turns in positions.items() for turn in range(len(turns)))
    with tqdm(total=total, desc="regenerate" + (f" (sample {sample})" if sample else ""), unit="turn",
              initial=resumed) as bar:
        for turn in range(max((len(turns) for turns in positions.values()), default=0)):
            pending = [(record, turn) for record, turns in positions.items() if turn < len(turns)]
            for record, _ in pending:  # apply replies finished by an earlier run
                if (record, turn) in done:
                    conversations[record].messages[positions[record][turn]]["content"] = done[(record, turn)]
                    counts["turns_resumed"] += 1
            prompts = {
                (record, turn): replier.token_ids(render(
                    tokenizer, conversations[record].messages[: positions[record][turn]], add_generation_prompt=True
                ))
                for record, turn in pending
                if (record, turn) not in done
            }
            # shortest first: a batch pads little. The order depends only on what is left, so a resumed run's
            # `generate` batches (seeded by their keys) are those of the run it continues
            order = sorted(prompts, key=lambda key: (len(prompts[key]), key))
            for (record, turn), reply in replier.replies(prompts, order, run_seed):
                conversations[record].messages[positions[record][turn]]["content"] = reply
                entry = {"record": record, "turn": turn, "content": reply} | ({"sample": sample} if sample else {})
                progress.write(json.dumps(entry) + "\n")
                progress.flush()
                os.fsync(progress.fileno())
                counts["turns_regenerated"] += 1
                bar.update(1)
            for record, _ in pending:  # an empty reply ends the conversation before that turn
                messages = conversations[record].messages
                cut = positions[record][turn]
                if not messages[cut]["content"]:
                    counts["empty_replies"] += 1
                    del messages[cut:]
                    positions[record] = positions[record][:turn]
