"""`specdistill eval` never decodes past the target's context window (issue 18: a 3,004-token prompt against a
2,048-position target gave a normal report): such a prompt is refused with one line by default, or left out and
counted with `eval.long_prompts=skip`; and the bound it checks is where the decoders really read positions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specdistill.distill.drafters import load_drafting
from specdistill.eval.benches import decoding_positions
from specdistill.distill.decoding import Decoder, DecodingConfig
from tests.conftest import run_cli

WINDOW = 64
PROMPTS = [{"prompt": "def f(x):", "id": "short-a"}, {"prompt": "x = 1\n" * 40, "id": "long-one"},
           {"prompt": "def g(y):", "id": "short-b"}]


@pytest.fixture(scope="module")
def small_window_model(tmp_path_factory: pytest.TempPathFactory, toy_tiny_path: Path) -> Path:
    """The tiny toy target with a 64-position context window (its weights unchanged)."""
    folder = tmp_path_factory.mktemp("window") / "model"
    shutil.copytree(toy_tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": WINDOW}))
    return folder


def run_eval(model: Path, tmp_path: Path, *extra: str):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    # the model drafts for itself (a causal LM folder on the target's tokenizer is a token-level drafter)
    return bench, run_cli("eval", "target=toy_tiny", f"target.name_or_path={model}", f"drafter_path={model}",
                          "bench=local", f"bench.path={bench}", "eval.max_new_tokens=8", "eval.warmup_prompts=0",
                          "eval.hf_baselines=false", f"out_dir={tmp_path}/out", *extra, cwd=tmp_path)


def test_a_prompt_past_the_context_window_is_refused_by_default(small_window_model: Path, tmp_path: Path):
    bench, result = run_eval(small_window_model, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    for part in (str(bench), "prompt 1 (id 'long-one')", "tokens", f"context window of {WINDOW}",
                 "max_position_embeddings", "eval.max_new_tokens", "eval.long_prompts=skip"):
        assert part in line, line
    assert not (tmp_path / "out" / "report.json").exists()


def test_long_prompts_skip_leaves_them_out_and_counts_them(small_window_model: Path, tmp_path: Path):
    _, result = run_eval(small_window_model, tmp_path, "eval.long_prompts=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    [report] = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert report["num_prompts"] == 2 and report["skipped_prompts"] == 1
    assert "left out 1 prompt(s)" in result.stdout and "long-one" in result.stdout  # the log says which
    lines = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert {line["id"] for line in lines} == {"short-a", "short-b"}


@pytest.mark.parametrize("config", [DecodingConfig(method="chain", gamma=3, max_new_tokens=10),
                                    DecodingConfig(method="tree", tree_depth=3, tree_top_k=2, tree_total_tokens=6,
                                                   max_new_tokens=10),
                                    DecodingConfig(method="chain", gamma=4, max_new_tokens=1)], ids=str)
def test_decoding_reads_positions_only_inside_the_checked_bound(tiny, toy_tiny_path: Path, config: DecodingConfig):
    """The target's forwards (the lean one's rope included) read positions below `decoding_positions`; with a drafter
    that is the target itself every draft is accepted, and a chain then reaches the bound's last position."""
    drafting = load_drafting(str(toy_tiny_path), tiny.target, "cpu")
    for proposer in (None, drafting):
        decoder = Decoder(tiny.target, proposer, config)
        read: list[int] = []
        forward = decoder._target

        def recording(tokens, positions, mask, last_logits_only=False):
            read.append(int(positions.max()))
            return forward(tokens, positions, mask, last_logits_only)

        decoder._target = recording
        prompt = tiny.prompts[0]
        generation = decoder.generate(prompt)
        assert len(generation.output_ids) == config.max_new_tokens  # no EOS given: every new token is decoded
        assert max(read) < decoding_positions(len(prompt), config)
        if proposer is not None and config.method == "chain" and config.max_new_tokens > 1:
            assert max(read) == decoding_positions(len(prompt), config) - 1
