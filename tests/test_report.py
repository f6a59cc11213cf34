"""The eval report writer: report.json shape, report.md tables, PNG plots, and no temporary files left."""

from __future__ import annotations

import json
import math
from pathlib import Path

from specdistill.eval.report import SCHEMA_KEYS, format_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = {"alpha_per_position.png", "per_category.png", "accept_lengths.png"}


def fake_result(drafter: str, tau: float, speedup: float) -> dict:
    return {
        "target": "toy_tiny",
        "drafter": drafter,
        "bench": "toy",
        "temperature": 0.0,
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
        "config": {"gamma": 4, "bench": {"name": "toy"}},
        "accept_length_histogram": [40, 30, 20, 10, 5],
        "per_category": {
            "toy-code": {"tau": tau, "speedup": speedup, "num_prompts": 15},
            "other": {"tau": tau - 0.2, "speedup": speedup - 0.1, "num_prompts": 5},
        },
    }


def test_two_drafters_write_a_list_tables_and_plots(tmp_path: Path) -> None:
    results = [fake_result("eagle1-toy", 2.4, 1.9), fake_result("eagle3-toy", 2.9, 2.3)]
    paths = write_report(tmp_path, results)

    assert set(paths) == {"report.json", "report.md"} | PLOT_NAMES
    assert {p.name for p in tmp_path.iterdir()} == set(paths)  # nothing temporary left behind
    report = json.loads((tmp_path / "report.json").read_text())
    assert isinstance(report, list) and len(report) == 2
    assert all(set(SCHEMA_KEYS) <= set(entry) for entry in report)
    assert [entry["drafter"] for entry in report] == ["eagle1-toy", "eagle3-toy"]

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


def test_one_result_is_an_object_and_nan_becomes_null(tmp_path: Path) -> None:
    result = fake_result("eagle3-toy", 2.9, 2.3)
    result["cost_ratio"] = math.nan
    write_report(tmp_path, [result])
    report = json.loads((tmp_path / "report.json").read_text())
    assert isinstance(report, dict) and set(SCHEMA_KEYS) <= set(report)
    assert report["cost_ratio"] is None and report["tau"] == 2.9
    assert "| — |" in (tmp_path / "report.md").read_text()  # a missing number shows as a dash


def test_results_without_extras_skip_their_plots(tmp_path: Path) -> None:
    result = {key: value for key, value in fake_result("d", 2.0, 1.5).items() if key in SCHEMA_KEYS}
    paths = write_report(tmp_path, [result])
    assert set(paths) == {"report.json", "report.md", "alpha_per_position.png"}
    assert {p.name for p in tmp_path.iterdir()} == set(paths)


def test_repeated_drafter_names_get_method_and_temperature(tmp_path: Path) -> None:
    greedy, sampled = fake_result("eagle3", 2.9, 2.3), fake_result("eagle3", 2.5, 2.0)
    sampled["temperature"] = 1.0
    table = format_table([greedy, sampled])
    assert "eagle3 (chain, T=0.0)" in table and "eagle3 (chain, T=1.0)" in table


def test_report_json_never_holds_bare_nan_and_md_says_what_the_lossless_check_compared(tmp_path: Path) -> None:
    result = fake_result("eagle3-toy", 2.9, 2.3)
    result["alpha_per_position"] = [0.8, math.nan]
    result["per_category"]["other"]["speedup"] = math.inf
    result["lossless_check_method"] = "greedy output equals plain decoding"
    write_report(tmp_path, [result])
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report["alpha_per_position"] == [0.8, None] and report["per_category"]["other"]["speedup"] is None
    assert report["lossless_check_method"] == "greedy output equals plain decoding"
    assert "Lossless check: greedy output equals plain decoding." in (tmp_path / "report.md").read_text()
