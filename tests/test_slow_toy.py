"""End to end on the default toy target (builds it: about 3-4 minutes on 2 CPU cores). Run with `pytest -m slow`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from specdistill.distill.toy import toy_chat_conversations
from specdistill.distill.targets import resolve_target_path
from tests.conftest import compose, run_cli
from tests.test_prep import masked_runs

pytestmark = pytest.mark.slow


def test_prep_on_the_default_toy_target(tmp_path: Path, cache_dir: Path):
    result = run_cli("prep", "target=toy", "data=toy_chat", f"out_dir={tmp_path}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    cfg = compose("prep", ["target=toy", f"cache_dir={cache_dir}", "out_dir=unused"])
    target_dir = Path(resolve_target_path(cfg.target, cfg.cache_dir))  # built by the run above: no rebuild here
    info = json.loads((target_dir / "build_info.json").read_text())
    assert info["heldout_loss"] < info["unigram_loss"] - 1.5

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    dataset = datasets.load_from_disk(str(tmp_path / "dataset"))
    decoded = sorted(
        tokenizer.decode(run, skip_special_tokens=True)
        for split in dataset.values() for row in split for run in masked_runs(row["input_ids"], row["loss_mask"])
    )
    expected = sorted(m["content"] for c in toy_chat_conversations() for m in c["messages"] if m["role"] == "assistant")
    assert decoded == expected


def test_quickstart_runs_end_to_end_and_the_trained_drafter_is_accepted(tmp_path: Path, cache_dir: Path):
    """The README's main command: prep → train EAGLE-3 → eval on the default toy target (< 15 min on 2 cores)."""
    result = run_cli("run", "experiment=quickstart", f"out_dir={tmp_path}", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| drafter |" in result.stdout and "report.md" in result.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"][0]  # the drafter; then transformers generate
    print("quickstart", {key: report[key] for key in ("tau", "speedup", "predicted_speedup", "cost_ratio")})
    assert report["lossless_check"] == "passed"
    assert report["tau"] > 1.5
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "train" / "drafter" / "model.safetensors").exists()
