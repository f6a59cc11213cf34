"""Record parsing and sources: every malformed form is caught with a reason; every local source form reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdistill.data_prep.readers import Conversation, MalformedRecord, PlainText, parse_record, read_records
from specdistill.distill.errors import UserError
from tests.conftest import compose

GOOD_SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
    ]
}
GOOD_MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_sharegpt_and_messages_normalise_to_the_same_roles():
    sharegpt = parse_record(GOOD_SHAREGPT, "auto")
    messages = parse_record(GOOD_MESSAGES, "messages")
    assert isinstance(sharegpt, Conversation) and isinstance(messages, Conversation)
    assert [m["role"] for m in sharegpt.messages] == ["system", "user", "assistant"]
    assert sharegpt.messages[1:] == messages.messages


def test_text_records_and_leading_assistant_turns():
    assert parse_record({"text": "abc"}, "auto") == PlainText("abc")
    record = {"conversations": [{"from": "gpt", "value": "intro"}, *GOOD_SHAREGPT["conversations"][1:]]}
    parsed = parse_record(record, "sharegpt")
    assert parsed.leading_turns_dropped == 1
    assert [m["content"] for m in parsed.messages] == ["hi", "hello"]


@pytest.mark.parametrize(
    ("record", "data_format", "reason"),
    [
        ({"foo": 1}, "auto", "no 'conversations', 'messages' or 'text' field"),
        ({"messages": []}, "messages", "empty conversation"),
        ({"messages": "hi"}, "messages", "expected a list of turns"),
        ({"messages": [{"role": "user"}]}, "messages", "messages[0].content is missing"),
        ({"messages": [{"content": "x"}]}, "messages", "messages[0] has no 'role' field"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages", "messages[0].role is 'narrator'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content is a int"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "messages[0].content is empty"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages",
            "messages[1] is a 'user' turn where 'assistant' was expected",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
        ({"text": 5}, "text", "field 'text' is a int"),
        (["not", "a", "dict"], "auto", "record is a list"),
        ({"conversations": [{"from": "human", "value": None}]}, "sharegpt", "conversations[0].value is missing"),
    ],
)
def test_malformed_records_name_the_field(record, data_format, reason):
    with pytest.raises(MalformedRecord, match=None) as caught:
        parse_record(record, data_format)
    assert reason in str(caught.value)


def data_cfg(path: Path | str, **overrides):
    extra = [f"data.{key}={value}" for key, value in overrides.items()]
    return compose("prep", ["data=local", f"data.path={path}", "out_dir=unused", *extra]).data


def test_every_local_source_form_reads(tmp_path: Path):
    import datasets

    rows = [GOOD_MESSAGES, GOOD_MESSAGES]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text((tmp_path / "a.jsonl").read_text())  # read by load_dataset
    for name in ("a.jsonl", "a.json", "a.parquet", "saved", "files"):
        records, _ = read_records(data_cfg(tmp_path / name))
        assert len(records) == 2, name
        assert parse_record(records[0], "auto").messages == GOOD_MESSAGES["messages"], name
    records, _ = read_records(data_cfg(tmp_path / "a.jsonl", max_records=1))
    assert len(records) == 1


def test_bad_lines_are_kept_in_place_as_malformed(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_MESSAGES) + "\n{not json\n" + json.dumps(GOOD_MESSAGES) + "\n")
    records, _ = read_records(data_cfg(path))
    assert len(records) == 3
    with pytest.raises(MalformedRecord, match="line 2 is not valid JSON"):
        parse_record(records[1], "auto")


def test_missing_sources_raise_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="data.path: file not found"):
        read_records(data_cfg(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="could not load dataset 'someone/missing-dataset'"):
        read_records(data_cfg("someone/missing-dataset"))
    with pytest.raises(UserError, match="unknown built-in dataset"):
        read_records(data_cfg("builtin:nope"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported suffix '.csv'"):
        read_records(data_cfg(tmp_path / "x.csv"))
