"""`data=alpaca`: Alpaca records ({"instruction", "input", "output"}) become one user and one assistant turn; the
preset's file, when missing, is named with the command that places it; prep masks only the reply."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from specdistill.data_prep.prep import prep
from specdistill.data_prep.readers import Conversation, MalformedRecord, parse_record, read_records
from specdistill.distill.errors import UserError
from tests.conftest import compose

RECORDS = [
    {"instruction": "Name three colors.", "input": "", "output": "Red, green and blue."},
    {"instruction": "Sum the numbers.", "input": "2, 3 and 4", "output": "The sum is 9."},
    {"instruction": "Reverse the word.", "input": "stop", "output": "pots"},
]


def test_instruction_and_input_make_the_user_turn():
    without_input = parse_record(RECORDS[0], "alpaca")
    with_input = parse_record(RECORDS[1], "auto")  # detected by its "instruction" field
    assert isinstance(without_input, Conversation) and isinstance(with_input, Conversation)
    assert without_input.messages == [
        {"role": "user", "content": "Name three colors."},
        {"role": "assistant", "content": "Red, green and blue."},
    ]
    assert with_input.messages[0] == {"role": "user", "content": "Sum the numbers.\n\n2, 3 and 4"}
    # a missing, null or blank input is no input
    for extra in ({}, {"input": None}, {"input": "  "}):
        record = {"instruction": "Name three colors.", "output": "Red, green and blue.", **extra}
        assert parse_record(record, "alpaca").messages == without_input.messages


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"input": "", "output": "x"}, "field 'instruction' is missing"),
        ({"instruction": 3, "input": "", "output": "x"}, "field 'instruction' is a int"),
        ({"instruction": " ", "input": "", "output": "x"}, "field 'instruction' is empty"),
        ({"instruction": "Do it.", "input": ""}, "field 'output' is missing"),
        ({"instruction": "Do it.", "input": "", "output": ["x"]}, "field 'output' is a list"),
        ({"instruction": "Do it.", "input": "", "output": ""}, "field 'output' is empty"),
        ({"instruction": "Do it.", "input": {"a": 1}, "output": "x"}, "field 'input' is a dict"),
        ("Do it.", "record is a str"),
    ],
)
def test_malformed_alpaca_records_name_the_field(record, reason):
    with pytest.raises(MalformedRecord) as caught:
        parse_record(record, "alpaca")
    assert reason in str(caught.value)


def test_the_presets_missing_file_is_named_with_the_setup_command(tmp_path: Path):
    data_cfg = compose("prep", ["data=alpaca", f"cache_dir={tmp_path}", "out_dir=unused"]).data
    assert data_cfg.path == f"{tmp_path}/real_bed/alpaca/alpaca_en_demo.json"  # ${cache_dir} from the top level
    with pytest.raises(UserError) as caught:
        read_records(data_cfg)
    message = str(caught.value)
    assert f"file not found: {data_cfg.path}" in message
    assert "`specdistill setup`" in message and "data.path=" in message


def write_alpaca(path: Path) -> Path:
    broken = [{"instruction": "No reply."}, {"instruction": "", "input": "", "output": "x"}]
    path.write_text(json.dumps(RECORDS * 3 + broken))
    return path


def masked_texts(tokenizer, dataset: datasets.DatasetDict) -> list[str]:
    """Each record's loss-masked tokens, decoded (special tokens dropped)."""
    texts = []
    for row in (row for split in dataset.values() for row in split):
        masked = [token for token, keep in zip(row["input_ids"], row["loss_mask"]) if keep]
        texts.append(tokenizer.decode(masked, skip_special_tokens=True))
    return texts


def test_prep_masks_only_the_reply(tmp_path: Path, cache_dir: Path, toy_tokenizer):
    path = write_alpaca(tmp_path / "alpaca.json")
    out_dir = tmp_path / "out"
    prep(compose("prep", ["target=toy_tiny", "data=alpaca", f"data.path={path}", "data.regenerate=false",
                          f"cache_dir={cache_dir}", f"out_dir={out_dir}"]))
    stats = json.loads((out_dir / "dataset" / "stats.json").read_text())
    assert (stats["records_in"], stats["records_kept"], stats["dropped_by_reason"]) == (11, 9, {"malformed": 2})
    assert [example["index"] for example in stats["malformed_examples"]] == [9, 10]
    assert "field 'output' is missing" in stats["malformed_examples"][0]["reason"]
    dataset = datasets.load_from_disk(str(out_dir / "dataset"))
    assert sorted(masked_texts(toy_tokenizer, dataset)) == sorted(record["output"] for record in RECORDS * 3)


def test_prep_regenerates_the_replies(tmp_path: Path, cache_dir: Path, toy_tokenizer):
    path = write_alpaca(tmp_path / "alpaca.json")
    out_dir = tmp_path / "out"
    prep(compose("prep", ["target=toy_tiny", "data=alpaca", f"data.path={path}", "data.regen.max_new_tokens=8",
                          f"cache_dir={cache_dir}", f"out_dir={out_dir}"]))  # the preset regenerates by default
    stats = json.loads((out_dir / "dataset" / "stats.json").read_text())
    assert stats["regenerated"]["turns_regenerated"] == 9
    replies = [json.loads(line) for line in (out_dir / "regenerated.jsonl").read_text().splitlines()]
    assert sorted(reply["record"] for reply in replies) == list(range(9))
    dataset = datasets.load_from_disk(str(out_dir / "dataset"))
    expected = sorted(reply["content"] for reply in replies if reply["content"])  # an empty reply drops its record
    assert sorted(masked_texts(toy_tokenizer, dataset)) == expected
