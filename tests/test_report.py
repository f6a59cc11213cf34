"""The eval report writer: report.json shape (distill/reports.py), report.md tables, PNG plots, and no temporary files
left."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from specdistill.distill.errors import UserError
from specdistill.distill.reports import ROW_KEYS, RUN_KEYS, read_report, report_document, report_rows
from specdistill.eval.report import format_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = {"alpha_per_position.png", "per_category.png", "accept_lengths.png"}
RUN = {"target": "toy_tiny", "bench": "toy", "temperature": 0.0, "hardware": "CPU (2 cores)",
       "config": {"eval": {"gamma": 4}, "bench": {"name": "toy"}}}


def fake_report(*rows: dict) -> dict:
    return report_document(RUN, list(rows))


def fake_result(drafter: str, tau: float, speedup: float) -> dict:
    """One row of a report."""
    return {
        "drafter": drafter,
        "method": "chain",
        "tau": tau,
        "alpha_per_position": [0.8, 0.6, 0.45, 0.3],
        "speedup": speedup,
        "predicted_speedup": speedup * 1.1,
        "tokens_per_s": 120.0 * speedup,
        "baseline_tokens_per_s": 120.0,
        "cost_ratio": 0.05,
        "num_prompts": 20,
        "new_tokens": 2560,
        "lossless_check": "passed",
        "lossless_check_method": None,
        "skipped_prompts": 0,
        "accept_length_histogram": [40, 30, 20, 10, 5],
        "per_category": {
            "toy-code": {"tau": tau, "speedup": speedup, "num_prompts": 15},
            "other": {"tau": tau - 0.2, "speedup": speedup - 0.1, "num_prompts": 5},
        },
    }


def test_two_drafters_write_one_object_with_two_rows_tables_and_plots(tmp_path: Path) -> None:
    results = [fake_result("eagle1-toy", 2.4, 1.9), fake_result("eagle3-toy", 2.9, 2.3)]
    paths = write_report(tmp_path, fake_report(*results))

    assert set(paths) == {"report.json", "report.md"} | PLOT_NAMES
    assert {p.name for p in tmp_path.iterdir()} == set(paths)  # nothing temporary left behind
    report = read_report(tmp_path, "reports")
    assert report["schema_version"] == 2 and set(RUN_KEYS) <= set(report) and len(report["rows"]) == 2
    assert all(set(ROW_KEYS) <= set(row) for row in report["rows"])
    assert [row["drafter"] for row in report["rows"]] == ["eagle1-toy", "eagle3-toy"]
    assert report_rows(report)[1] == {**{key: RUN[key] for key in RUN_KEYS if key != "config"}, **results[1]}

    markdown = (tmp_path / "report.md").read_text()
    table = format_table(results)
    assert table in markdown
    assert table.splitlines()[0].startswith("| drafter | method | τ | speedup |")
    assert len(table.splitlines()) == 2 + len(results)
    assert "| eagle3-toy | chain | 2.90 | 2.30× |" in table
    assert "## Per category" in markdown and "| eagle1-toy | other | 5 |" in markdown
    assert "α4" in markdown
    for name in PLOT_NAMES:
        assert f"({name})" in markdown
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_one_drafter_is_the_same_object_with_one_row_and_nan_becomes_null(tmp_path: Path) -> None:
    result = fake_result("eagle3-toy", 2.9, 2.3)
    result["cost_ratio"] = math.nan
    write_report(tmp_path, fake_report(result))
    report = json.loads((tmp_path / "report.json").read_text())
    assert isinstance(report, dict) and len(report["rows"]) == 1 and set(ROW_KEYS) <= set(report["rows"][0])
    assert report["rows"][0]["cost_ratio"] is None
    # the table row, formatted: τ and speedups to 2 decimals, tokens/s to 1, the missing c as a dash
    row = "| eagle3-toy | chain | 2.90 | 2.30× | 2.53× | 276.0 | 120.0 | — | passed |"
    assert row in (tmp_path / "report.md").read_text()


def test_results_without_extras_skip_their_plots(tmp_path: Path) -> None:
    result = {key: value for key, value in fake_result("d", 2.0, 1.5).items() if key in ROW_KEYS}
    paths = write_report(tmp_path, fake_report(result))
    assert set(paths) == {"report.json", "report.md", "alpha_per_position.png"}
    assert {p.name for p in tmp_path.iterdir()} == set(paths)


def test_repeated_drafter_names_get_method_and_temperature(tmp_path: Path) -> None:
    greedy, sampled = (report_rows(fake_report(fake_result("eagle3", tau, 2.0)))[0] for tau in (2.9, 2.5))
    sampled["temperature"] = 1.0
    table = format_table([greedy, sampled])
    assert "eagle3 (chain, T=0.0)" in table and "eagle3 (chain, T=1.0)" in table


def test_report_json_never_holds_bare_nan_and_md_says_what_the_lossless_check_compared(tmp_path: Path) -> None:
    result = fake_result("eagle3-toy", 2.9, 2.3)
    result["alpha_per_position"] = [0.8, math.nan]
    result["per_category"]["other"]["speedup"] = math.inf
    result["lossless_check_method"] = "greedy output equals plain decoding"
    write_report(tmp_path, fake_report(result))
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    [report] = json.loads(text)["rows"]
    assert report["alpha_per_position"] == [0.8, None] and report["per_category"]["other"]["speedup"] is None
    # the method is said once, right under the main table
    markdown = (tmp_path / "report.md").read_text()
    after_table = markdown.split(format_table([result]) + "\n", 1)[1]
    assert after_table.startswith("\nLossless check: greedy output equals plain decoding.\n")
    assert markdown.count("Lossless check:") == 1


def test_a_report_missing_a_key_or_of_another_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"row of drafter 'd' lacks the keys \['skipped_prompts'\]"):
        report_document(RUN, [{key: value for key, value in fake_result("d", 2.0, 1.5).items()
                               if key != "skipped_prompts"}])
    (tmp_path / "report.json").write_text(json.dumps([{**RUN, **fake_result("d", 2.0, 1.5)}]))  # schema 1: a list
    with pytest.raises(UserError, match=r"^reports: .*report.json does not hold a JSON object; pass a report.json"):
        read_report(tmp_path / "report.json", "reports")
    (tmp_path / "report.json").write_text(json.dumps({**RUN, **fake_result("d", 2.0, 1.5)}))  # schema 1: one object
    with pytest.raises(UserError, match=r"^reports: .*report.json is not a report.json of schema version 2"):
        read_report(tmp_path, "reports")


def test_drafted_lengths_are_summed_over_turns_and_counted_per_length() -> None:
    from specdistill.distill.decoding import Generation
    from specdistill.eval.metrics import combine_turns, summarize

    def turn(accept_lengths: list[int], draft_lengths: list[int]) -> Generation:
        tokens = [1] * (1 + sum(accept_lengths))
        return Generation(tokens, accept_lengths, [len(draft_lengths)] * 3, [0] * 3, draft_lengths=draft_lengths,
                          seconds=1.0, target_calls=len(tokens))

    prompt = combine_turns([turn([2, 1], [3, 1]), turn([4], [3])])
    plain = combine_turns([turn([1, 1], []), turn([1], [])])
    numbers = summarize([prompt], [plain], ["writing"], depth=3)
    assert prompt.draft_lengths == [3, 1, 3]
    assert numbers["mean_draft_length"] == pytest.approx(7 / 3)
    assert numbers["draft_length_histogram"] == [0, 1, 0, 2]  # index n: steps that drafted n tokens
    assert numbers["tau"] == pytest.approx(7 / 3)
