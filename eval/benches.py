"""Benchmark prompt sets for `specdistill eval`, and rendering a prompt into the target's input ids.

A bench comes from one of three places (first that applies):
- `bench.path`: a local `.jsonl` file, one prompt a line: `{"prompt": str}` or MT-Bench style `{"turns": [str, ...]}`,
  optional `"category"` and `"id"` (DESIGN.md, "Files other tools read");
- `bench.name=toy`: the toy target's held-out `bench` split of the standard library (no download);
- `bench.hub_name`: a Hugging Face Hub dataset, read with `datasets.load_dataset`.
Prompts are taken in file order, so the first `num_prompts` are the same on every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from specdistill.distill.errors import UserError
from specdistill.distill.decoding import DecodingConfig

SPEC_BENCH_URL = "https://github.com/hemingkx/Spec-Bench/blob/main/data/spec_bench/question.jsonl"
# Benches that are not on the Hub: where their prompt file comes from.
DOWNLOAD_HINTS = {"spec_bench": f"download question.jsonl from the Spec-Bench GitHub repository ({SPEC_BENCH_URL})"}
# Row fields that hold a prompt's id in common benchmark files (Spec-Bench, MT-Bench, HumanEval).
ID_FIELDS = ("id", "question_id", "prompt_id", "task_id")
LOCAL_FORMAT = 'one JSON object a line: {"prompt": str} or {"turns": [str, ...]}, optional "category" and "id"'
TOY_CATEGORY = "toy-code"


@dataclass
class BenchConfig:
    """The `bench` config group's schema."""

    name: str = "toy"
    path: Optional[str] = None  # a local .jsonl prompt file; when set it wins over everything else
    hub_name: Optional[str] = None  # Hugging Face Hub dataset name
    hub_config: Optional[str] = None  # the Hub dataset's configuration (subset) name
    split: str = "test"
    prompt_field: str = "prompt"  # field holding the prompt: a string, or a list of turns (MT-Bench)
    input_field: Optional[str] = None  # appended to the prompt after a blank line when non-empty (Alpaca's "input")
    category: Optional[str] = None  # one category for every prompt; else the row's "category", else the bench name
    chat_template: bool = True  # render prompts with the target's chat template when it has one
    num_turns: int = 1  # turns kept per prompt (MT-Bench has 2; decoding uses the first)


@dataclass
class BenchPrompt:
    id: str
    category: str
    turns: list[str]  # user turns; the first is what gets decoded
    system: str | None = None  # system message, sent before the first turn when the chat template is used


def load_bench(cfg: BenchConfig, num_prompts: int | None, seed: int = 0) -> list[BenchPrompt]:
    """The first `num_prompts` prompts of the bench (None: all), in file order."""
    if cfg.num_turns < 1:
        raise UserError(f"bench.num_turns is {cfg.num_turns}; it must be at least 1")
    if cfg.path:
        prompts, source = _local_prompts(cfg, num_prompts), str(Path(cfg.path).expanduser())
    elif cfg.name == "toy":
        prompts, source = _toy_prompts(cfg, num_prompts, seed), "the toy target's held-out bench split"
    elif cfg.hub_name:
        prompts, source = _hub_prompts(cfg, num_prompts), f"Hub dataset '{cfg.hub_name}', split '{cfg.split}'"
    elif cfg.name in DOWNLOAD_HINTS:
        hint = DOWNLOAD_HINTS[cfg.name]
        raise UserError(f"bench '{cfg.name}' is not on the Hugging Face Hub: {hint} and pass bench.path=<file.jsonl>")
    else:  # bench=local without a path (a schema default of None means `path: ???` cannot mark it required)
        raise UserError(f"bench '{cfg.name}' needs a prompt file: pass bench.path=<file.jsonl> ({LOCAL_FORMAT})")
    if not prompts:
        raise UserError(f"bench '{cfg.name}' has no prompts ({source})")
    return prompts


def render_prompt(tokenizer: Any, prompt: BenchPrompt, chat_template: bool) -> list[int]:
    """Token ids of the prompt's first turn, ready for generation (ends with the assistant header under a template)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        messages.append({"role": "user", "content": prompt.turns[0]})
        # tokenize=False returns the text (transformers v5 returns a BatchEncoding when tokenizing); the template
        # already holds any BOS it wants, so encoding adds no special tokens of its own.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt.turns[0])["input_ids"])


def decoding_positions(prompt_tokens: int, decoding: DecodingConfig) -> int:
    """How many positions (0, 1, …) the target's forwards may read for a prompt: the prompt's, one per new token but
    the last (never fed back), and a step's drafts, verified at up to the draft depth (γ of a chain, a tree's depth)
    past the last committed token. Plain decoding and the drafters read fewer."""
    return prompt_tokens + decoding.max_new_tokens - 1 + decoding.draft_depth


def fit_context_window(prompts: list[BenchPrompt], prompt_ids: list[list[int]], decoding: DecodingConfig,
                       window: int | None, skip: bool, bench: str) -> list[int]:
    """The indices of the prompts whose decoding stays inside the target's context window of `window` positions (None:
    the target declares none). Past it the target reads rotary positions it was never trained on and decodes worse
    without a word, so such a prompt is refused with one line naming it, or left out when `skip`."""
    if window is None:
        return list(range(len(prompts)))
    kept = []
    for index, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        needed = decoding_positions(len(ids), decoding)
        if needed <= window:
            kept.append(index)
        elif not skip:
            room = window - needed + decoding.max_new_tokens  # the largest eval.max_new_tokens that fits
            fix = f"lower eval.max_new_tokens to {room}" if room >= 1 else "shorten the prompt"
            raise UserError(
                f"{bench}: prompt {index} (id '{prompt.id}') is {len(ids)} tokens, and decoding it with "
                f"eval.max_new_tokens={decoding.max_new_tokens} and eval.{decoding.draft_depth_key}="
                f"{decoding.draft_depth} reads {needed} positions, past the target's context window of {window} (config.max_position_embeddings): "
                f"{fix}, or set eval.long_prompts=skip to leave such prompts out")
    if not kept:
        raise UserError(f"{bench}: all {len(prompts)} prompts are too long to decode within the target's context "
                        f"window of {window} (config.max_position_embeddings) with eval.max_new_tokens="
                        f"{decoding.max_new_tokens}, so eval.long_prompts=skip leaves none; lower eval.max_new_tokens")
    return kept


def _toy_prompts(cfg: BenchConfig, num_prompts: int | None, seed: int) -> list[BenchPrompt]:
    from specdistill.distill.toy import toy_chat_conversations

    conversations = toy_chat_conversations(split="bench", seed=seed, max_conversations=num_prompts)
    prompts = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        prompts.append(BenchPrompt(f"toy-{index}", cfg.category or TOY_CATEGORY, [first_user], system))
    return prompts


def _local_prompts(cfg: BenchConfig, num_prompts: int | None) -> list[BenchPrompt]:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"bench.path={cfg.path}: no such file; expected a .jsonl file, {LOCAL_FORMAT}")
    prompts: list[BenchPrompt] = []
    with path.open("rb") as file:  # bytes, decoded line by line, so a bad byte is reported with its line
        for line_number, raw_line in enumerate(file, start=1):
            if num_prompts is not None and len(prompts) >= num_prompts:
                break
            where = f"{path}, line {line_number}"
            try:  # utf-8-sig: a byte-order mark at the start of the file is not part of the first row
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{where}: not UTF-8 text (byte 0x{raw_line[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected {LOCAL_FORMAT}"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: a JSON {type(row).__name__}, not an object; expected {LOCAL_FORMAT}")
            # "turns" first (MT-Bench / Spec-Bench rows), then the configured field, then "prompt".
            field = next((f for f in ("turns", cfg.prompt_field, "prompt") if f in row), None)
            if field is None:
                configured = f" nor bench.prompt_field='{cfg.prompt_field}'" if cfg.prompt_field != "prompt" else ""
                raise UserError(f"{where}: no 'prompt' or 'turns' field{configured}; expected {LOCAL_FORMAT}")
            prompts.append(_row_prompt(cfg, row, field, len(prompts), where))
    return prompts


def _hub_prompts(cfg: BenchConfig, num_prompts: int | None) -> list[BenchPrompt]:
    import datasets

    try:
        rows = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.split)
    except Exception as error:  # offline, unknown name, missing split: all fixed the same way
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(
            f"bench '{cfg.name}': cannot load '{cfg.hub_name}' from the Hugging Face Hub ({reason}). Without Hub "
            f"access, download its prompts as a .jsonl file ({LOCAL_FORMAT}) and pass bench.path=<file.jsonl>"
        ) from None
    if cfg.prompt_field not in rows.column_names:
        raise UserError(
            f"bench '{cfg.name}': Hub dataset '{cfg.hub_name}' has no field bench.prompt_field='{cfg.prompt_field}' "
            f"(fields: {rows.column_names})"
        )
    count = len(rows) if num_prompts is None else min(num_prompts, len(rows))
    where = f"Hub dataset '{cfg.hub_name}', split '{cfg.split}', row"
    return [_row_prompt(cfg, rows[i], cfg.prompt_field, i, f"{where} {i}") for i in range(count)]


def _row_prompt(cfg: BenchConfig, row: dict, field: str, index: int, where: str) -> BenchPrompt:
    """One row as a BenchPrompt; `where` names the row in error messages."""
    value = row[field]
    turns = [value] if isinstance(value, str) else value
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise UserError(f"{where}: field '{field}' is not a string or a non-empty list of strings")
    turns = turns[: cfg.num_turns]
    extra = row.get(cfg.input_field) if cfg.input_field else None
    if isinstance(extra, str) and extra.strip():
        turns[0] = f"{turns[0]}\n\n{extra}"
    if not turns[0].strip():  # without a chat template an empty prompt is no tokens at all: nothing to decode from
        raise UserError(f"{where}: field '{field}' holds an empty prompt; give it text or remove the row")
    row_id = next((row[f] for f in ID_FIELDS if row.get(f) is not None), f"{cfg.name}-{index}")
    category = cfg.category or row.get("category") or cfg.name
    return BenchPrompt(id=str(row_id), category=str(category), turns=turns)
