"""`specdistill eval` end to end on the tiny toy target: the report files, the lossless check, several drafters in
one table, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdistill.distill.outputs import mark_stage
from specdistill.distill.reports import ROW_KEYS, RUN_KEYS, read_report
from tests.conftest import run_cli

EVAL = ["target=toy_tiny", "bench=toy", "eval.num_prompts=4", "eval.max_new_tokens=24", "eval.warmup_prompts=1"]


@pytest.mark.slow
def test_eval_writes_the_report_of_a_trained_drafter(trained_drafter, tmp_path: Path):
    out_dir, result = trained_drafter("eagle3")
    assert result.returncode == 0, result.stderr[-2000:]
    eagle3 = out_dir / "drafter"
    mark_stage(tmp_path, "eval")  # an earlier eval run's out_dir, with its report
    (tmp_path / "report.json").write_text('{"tau": 9.9}')
    eval_run = run_cli("eval", *EVAL, f"drafter_path={eagle3}", f"out_dir={tmp_path}", cwd=tmp_path)
    assert eval_run.returncode == 0, eval_run.stderr[-3000:]
    assert (tmp_path / "previous" / "report.json").read_text() == '{"tau": 9.9}'
    document = read_report(tmp_path, "out_dir")
    assert set(RUN_KEYS) <= set(document) and document["temperature"] == 0.0 and document["bench"] == "toy"
    report, hf_generate = document["rows"]  # the drafter, then transformers' plain greedy generate
    assert hf_generate["drafter"] == "transformers generate" and hf_generate["lossless_check"] == "passed"
    assert report["speedup_over_transformers"] == pytest.approx(report["tokens_per_s"] / hf_generate["tokens_per_s"])
    assert set(ROW_KEYS) <= set(report) and report["drafter"] == str(eagle3) and report["skipped_prompts"] == 0
    assert report["lossless_check"] == "passed" and report["num_prompts"] == 4 and report["method"] == "chain"
    assert report["lossless_check_method"] == "greedy output equals plain decoding"
    # τ is the mean of the accept lengths written beside it (and a trained drafter is accepted: τ well above 1)
    assert len(report["alpha_per_position"]) == 5 and report["tau"] > 1.2
    assert "| drafter |" in eval_run.stdout and "report.md" in eval_run.stdout  # the table is printed at the end
    for name in ("report.md", "alpha_per_position.png", "generations.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 8  # 4 prompts × (plain, the drafter)
    for line in lines:
        assert sum(line["accept_lengths"]) + 1 == len(line["output_ids"])


@pytest.mark.slow
def test_eval_compares_drafters_side_by_side_with_tree_decoding_and_sampling(trained_drafter, tmp_path: Path):
    paths = [trained_drafter(kind)[0] / "drafter" for kind in ("eagle1", "eagle3")]
    eval_run = run_cli("eval", *EVAL, f"drafter_path=[{paths[0]},{paths[1]}]", "eval.method=tree",
                       "eval.temperature=0.8", "eval.tree_depth=3", "eval.tree_top_k=3", "eval.tree_total_tokens=10",
                       f"out_dir={tmp_path}", cwd=tmp_path)
    assert eval_run.returncode == 0, eval_run.stderr[-3000:]
    document = read_report(tmp_path, "out_dir")
    reports = document["rows"]
    assert [r["drafter"] for r in reports] == [str(path) for path in paths] and document["temperature"] == 0.8
    # a tree of depth 3: an α per depth, and a step commits at most 3 drafted tokens + the target's own one
    assert all(len(r["alpha_per_position"]) == 3 and 1 <= r["tau"] <= 4 for r in reports)
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 3  # 4 prompts × (plain, 2 drafters)
    for line in lines:
        assert all(1 <= length <= (1 if line["drafter"] == "plain" else 4) for length in line["accept_lengths"]), line
    assert all(r["lossless_check"] == "passed" for r in reports)  # re-decoded greedily with and without the drafter
    assert all(r["lossless_check_method"].startswith("greedy re-decode with and without the drafter; the sampled "
                                                     "outputs are not compared") for r in reports)
    assert "Lossless check: greedy re-decode" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_eval_refuses_bad_input_with_one_clear_message(tmp_path: Path, toy_tiny_path):
    def eval_error(*extra: str) -> str:
        result = run_cli("eval", *EVAL, f"out_dir={tmp_path}/out", *extra, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "out" / "report.json").exists()
        return result.stderr

    assert "error: drafter_path: /nope " in eval_error("drafter_path=/nope")  # the loader says what is wrong
    assert "eval.gama" in eval_error("drafter_path=/nope", "eval.gama=3")  # a typo fails at start
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    assert f"{bad}" in eval_error(f"drafter_path={toy_tiny_path}", "bench=local", f"bench.path={bad}")
