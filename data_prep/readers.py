"""Read raw records from a Hub dataset, a local file or folder, and turn each into a validated conversation.

Accepted record forms (`data.format=auto` detects each record's form from its fields):
- ShareGPT:  {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
- messages:  {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}  (OpenAI form)
- Alpaca:    {"instruction": str, "input": str (optional, may be empty), "output": str}  (one user turn, the
             instruction plus "\n\n" + input when input is non-empty, and one assistant turn, the output)
- text:      {"text": str}  (no chat template; every token is trained on)

A record that cannot be used raises `MalformedRecord` with the reason; the caller counts and reports it by index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from specdistill.distill.errors import UserError

# ShareGPT dumps name the assistant after the service it came from; all of these are the assistant role.
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
FORMAT_FIELDS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role", "content")}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class MalformedRecord(Exception):
    """A record that cannot be used; the message is the reason."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # [{"role", "content"}], roles system? (user assistant)+ user?
    leading_turns_dropped: int = 0  # assistant turns before the first user turn (common in ShareGPT dumps)


@dataclass
class PlainText:
    text: str


def detect_format(record: dict) -> str:
    for name, (list_field, _, _) in FORMAT_FIELDS.items():
        if list_field in record:
            return name
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise MalformedRecord(
        f"no 'conversations', 'messages' or 'text' field, nor an Alpaca 'instruction' (fields: {sorted(record)[:8]})"
    )


def parse_record(record: Any, data_format: str) -> Conversation | PlainText:
    """Validate one raw record and return it as a `Conversation` (or `PlainText`), or raise `MalformedRecord`."""
    if isinstance(record, _UnreadableLine):
        raise MalformedRecord(record.reason)
    if not isinstance(record, dict):
        raise MalformedRecord(f"record is a {type(record).__name__}, not an object")
    if data_format == "auto":
        data_format = detect_format(record)
    if data_format == "text":
        text = record.get("text")
        if not isinstance(text, str):
            raise MalformedRecord(f"field 'text' is {_describe(text)}, expected a string")
        if not text.strip():
            raise MalformedRecord("field 'text' is empty")
        return PlainText(text)
    if data_format == "alpaca":
        return _parse_alpaca(record)
    list_field, role_field, content_field = FORMAT_FIELDS[data_format]
    turns = record.get(list_field)
    if not isinstance(turns, list):
        raise MalformedRecord(f"field '{list_field}' is {_describe(turns)}, expected a list of turns")
    if not turns:
        raise MalformedRecord(f"field '{list_field}' is an empty conversation")
    messages = []
    for turn_index, turn in enumerate(turns):
        where = f"{list_field}[{turn_index}]"
        if not isinstance(turn, dict):
            raise MalformedRecord(f"{where} is {_describe(turn)}, expected an object")
        role, content = turn.get(role_field), turn.get(content_field)
        if role_field not in turn:
            raise MalformedRecord(f"{where} has no '{role_field}' field")
        if role not in ROLE_ALIASES:
            raise MalformedRecord(
                f"{where}.{role_field} is {role!r}, expected one of {sorted(set(ROLE_ALIASES))}"
            )
        if not isinstance(content, str):
            raise MalformedRecord(f"{where}.{content_field} is {_describe(content)}, expected a string")
        if not content.strip():
            raise MalformedRecord(f"{where}.{content_field} is empty")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return _check_turn_order(messages, list_field)


def _parse_alpaca(record: dict) -> Conversation:
    """One user turn (instruction, then the input after a blank line when there is one) and one assistant turn.
    A missing or null `input` is taken as empty: Alpaca-style sets without inputs often leave the field out."""
    instruction, output = _alpaca_field(record, "instruction"), _alpaca_field(record, "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise MalformedRecord(f"field 'input' is {_describe(extra)}, expected a string (or empty)")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _alpaca_field(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise MalformedRecord(f"field '{name}' is {_describe(value)}, expected a string")
    if not value.strip():
        raise MalformedRecord(f"field '{name}' is empty")
    return value


def _check_turn_order(messages: list[dict[str, str]], list_field: str) -> Conversation:
    """System first (optional), then user and assistant alternating; leading assistant turns are dropped."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    leading = 0
    while rest and rest[0]["role"] == "assistant":
        rest, leading = rest[1:], leading + 1
    for index, message in enumerate(rest):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = len(system) + leading + index
            raise MalformedRecord(f"{list_field}[{position}] is a '{message['role']}' turn where '{expected}' was expected")
    if not any(message["role"] == "assistant" for message in rest):
        raise MalformedRecord("conversation has no assistant turn after a user turn")
    return Conversation(system + rest, leading_turns_dropped=leading)


def _describe(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class _UnreadableLine:
    """A .jsonl line that is not valid JSON: kept in place so that it is counted and reported by its index."""

    reason: str


def read_records(data_cfg: Any, builtin_records: dict[str, Any] | None = None) -> tuple[Sequence[Any], str]:
    """All raw records of `data.path` (at most `data.max_records`) and a description of where they came from.

    `builtin_records` maps `builtin:<name>` sources to a function returning their records (the toy chat data).
    """
    path = str(data_cfg.path)
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if not builtin_records or name not in builtin_records:
            known = ", ".join(f"builtin:{key}" for key in (builtin_records or {}))
            raise UserError(f"data.path: unknown built-in dataset '{path}' (known: {known or 'none'})")
        records = builtin_records[name]()
    else:
        local = Path(path).expanduser()
        if local.exists():
            records = _read_local(local, data_cfg)
        elif HUB_NAME.match(path) and not path.endswith(LOCAL_SUFFIXES):
            records = _read_hub(path, data_cfg)
        else:
            raise _not_found(path, data_cfg.setup_command)
    if data_cfg.max_records is not None:
        records = records[: data_cfg.max_records] if isinstance(records, list) else records.select(
            range(min(data_cfg.max_records, len(records)))
        )
    return records, path


def _not_found(path: str, setup_command: str | None) -> UserError:
    if setup_command:  # a preset's file that a setup step downloads
        advice = (f"This data preset's file is placed by `{setup_command}`: run it first, or pass "
                  "data.path=<your own file> (.jsonl/.json/.parquet).")
    else:
        advice = "Point data.path at a .jsonl/.json/.parquet file, a datasets folder, or a Hub dataset name."
    return UserError(f"data.path: file not found: {path}\n  {advice}")


def _read_local(path: Path, data_cfg: Any) -> Sequence[Any]:
    if path.is_dir():
        return _read_folder(path, data_cfg)
    if path.suffix == ".jsonl":
        return list(_read_jsonl(path))
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"data.path: {path} is not valid JSON: {error}") from None
        if not isinstance(content, list):
            raise UserError(f"data.path: {path} holds a JSON {type(content).__name__}; expected a list of records")
        return content
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path))
    raise UserError(f"data.path: {path} has an unsupported suffix '{path.suffix}'; use .jsonl, .json or .parquet")


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _UnreadableLine(f"line {line_number} is not valid JSON ({error.msg})")


def _read_folder(path: Path, data_cfg: Any) -> Sequence[Any]:
    """A `save_to_disk` folder (Dataset or DatasetDict), or a folder of data files read by `load_dataset`."""
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if data_cfg.split not in loaded:
                raise UserError(f"data.split: '{data_cfg.split}' is not a split of {path} (splits: {list(loaded)})")
            return loaded[data_cfg.split]
        return loaded
    return _read_hub(str(path), data_cfg)


def _read_hub(name: str, data_cfg: Any) -> Sequence[Any]:
    """`datasets.load_dataset` on a Hub name (or a local folder of data files)."""
    import datasets

    try:
        return datasets.load_dataset(
            name,
            name=data_cfg.subset,
            split=data_cfg.split,
            data_files=data_cfg.data_files,
            revision=data_cfg.revision,
        )
    except Exception as error:  # datasets raises many types (connection, missing split, bad files)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"data.path: could not load dataset '{name}' (split '{data_cfg.split}'): {first_line}\n"
            "  Without Hub access (HF_HUB_OFFLINE=1) point data.path at a local .jsonl/.json/.parquet file or folder."
        ) from None
