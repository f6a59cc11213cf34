"""A drafter kind is one unit: the registry finds it, its training forward and its decoding forward agree, and a
new kind (tests/kinds/copy_last.py + one yaml) trains and decodes losslessly through the unchanged CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdistill.distill import lean
from specdistill.distill.drafters import drafter_kind, registered_kinds
from specdistill.distill.drafters.feature import BuildContext, FeatureDrafter
from specdistill.distill.drafters.modules import causal_bias
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.masks import PrefixMask
from tests.conftest import REPO_ROOT, TRAIN_FAST

KINDS_DIR = Path(__file__).parent / "kinds"
FEATURE_KINDS = [kind.name for kind in registered_kinds()  # Medusa (no training_step): tests/test_medusa.py
                 if issubclass(kind.model_class, FeatureDrafter) and hasattr(kind.model_class, "training_step")]


def build(kind: str, target, **options) -> FeatureDrafter:
    """An untrained drafter of `kind` with every weight (norms included) randomised, so a dropped op shows."""
    torch.manual_seed(0)
    unit = drafter_kind(kind)
    drafter = unit.model_class.build(unit.options(**options), BuildContext(target, eagle3_layers=[0, 1, -1])).eval()
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return drafter


def training_logits(drafter: FeatureDrafter, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The training forward over a whole sequence of (t_{i+1}, h_i) pairs, causal → logits of every position."""
    positions = torch.arange(tokens.shape[1])[None]
    bias = causal_bias(torch.ones_like(tokens), hidden.dtype)
    return drafter.training_step(tokens, hidden, positions, bias, with_logits=True)[1][0]


def check_parity(drafter: FeatureDrafter, target) -> None:
    """Decoding forward == training forward: prefill, a chain step, a tree-masked step (siblings and a child)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, target.config.vocab_size, (1, 14), generator=generator)
    with torch.no_grad():
        hidden = drafter.hidden_input(target(tokens, feature_layers=drafter.feature_layers).features)
        head, cache, masks = drafter.head(), KVCache(), PrefixMask()
        # decoding reads token t_{i+1} at position i: the pairs are (tokens[:, 1:], hidden[:, :-1])
        pairs, states, prefix = tokens[:, 1:], hidden[:, :-1], 8
        expected = training_logits(drafter, pairs, states)
        _, prefill = head(pairs[:, :prefix], states[:, :prefix], torch.arange(prefix)[None], cache, None)
        torch.testing.assert_close(prefill[0], expected[:prefix], atol=1e-4, rtol=1e-4)
        _, chain = head(pairs[:, prefix : prefix + 1], states[:, prefix : prefix + 1], torch.tensor([[prefix]]), cache, None)
        torch.testing.assert_close(chain[0, 0], expected[prefix], atol=1e-4, rtol=1e-4)
        # a tree level after prefix + 1 committed pairs: two siblings at position p, a child of the first at p + 1
        p, sibling = prefix + 1, torch.tensor([[7]])
        tree_tokens = torch.cat([pairs[:, p : p + 1], sibling, pairs[:, p + 1 : p + 2]], dim=1)
        tree_states = torch.cat([states[:, p : p + 1], states[:, p : p + 1], states[:, p + 1 : p + 2]], dim=1)
        block = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
        _, tree = head(tree_tokens, tree_states, torch.tensor([[p, p, p + 1]]), cache, masks(cache.length, block))
        torch.testing.assert_close(tree[0, 0], expected[p], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tree[0, 2], expected[p + 1], atol=1e-4, rtol=1e-4)
        with_sibling = training_logits(drafter, torch.cat([pairs[:, :p], sibling], 1), states[:, : p + 1])
        torch.testing.assert_close(tree[0, 1], with_sibling[p], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_training_and_decoding_forwards_agree(tiny, kind):
    check_parity(build(kind, tiny.target), tiny.target)


@pytest.mark.parametrize(("kind", "options"), [
    ("fspad", {"feature_sampling": False}), ("fspad", {"partial_alignment": False}), ("fspad", {"num_layers": 2}),
    ("eagle3", {"norm_before_residual": True}), ("eagle3", {"num_layers": 2}), ("eagle3", {"norm_before_fc": True}),
    ("eagle3", {"fc_norm": True}), ("eagle3", {"fc_norm": True, "norm_before_fc": True}),
], ids=str)
def test_variants_keep_training_and_decoding_in_agreement(tiny, kind, options):
    check_parity(build(kind, tiny.target, **options), tiny.target)


@pytest.mark.parametrize("flag", ["norm_before_residual", "norm_before_fc", "fc_norm"])
def test_each_eagle3_norm_flag_changes_the_drafter_and_is_saved(tiny, tmp_path, flag):
    plain, variant = build("eagle3", tiny.target), build("eagle3", tiny.target, **{flag: True})
    variant.load_state_dict(plain.state_dict(), strict=False)  # the variant's extra norms keep their random weights
    tokens = torch.randint(3, tiny.target.config.vocab_size, (1, 6))
    features = tiny.target(tokens, feature_layers=plain.feature_layers).features
    plain_logits = training_logits(plain, tokens, plain.hidden_input(features))
    assert not torch.allclose(plain_logits, training_logits(variant, tokens, variant.hidden_input(features)))
    variant.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[flag] is True


def test_fspad_with_both_switches_off_is_eagle1(tiny):
    """Same weights, same inputs: the same loss, agreement and logits as EAGLE-1 (the ablation baseline is exact)."""
    from specdistill.distill.objectives import FeatureObjective

    eagle1 = build("eagle1", tiny.target)
    fspad = build("fspad", tiny.target, feature_sampling=False, partial_alignment=False)
    assert set(fspad.state_dict()) == set(eagle1.state_dict())
    fspad.load_state_dict(eagle1.state_dict())
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (2, 12), generator=generator)
    attention_mask, loss_mask = torch.ones_like(input_ids), torch.ones_like(input_ids)
    output = tiny.target(input_ids, attention_mask, feature_layers=(-1,), for_training=True)
    objective = FeatureObjective(noise=0.0)
    expected = eagle1.training_loss(input_ids, attention_mask, loss_mask, output, objective)
    got = fspad.training_loss(input_ids, attention_mask, loss_mask, output, objective)
    torch.testing.assert_close(got.loss_sum, expected.loss_sum)
    assert torch.equal(got.agree, expected.agree)
    assert build("fspad", tiny.target).training_loss(input_ids, attention_mask, loss_mask, output, objective).loss_sum \
        != expected.loss_sum  # and the default FSPAD is a different model


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_parity_check_fails_when_the_decoding_side_drops_its_norms(tiny, kind, monkeypatch):
    drafter = build(kind, tiny.target)
    for module in {sys.modules[drafter.head().__class__.__module__], lean}:
        if hasattr(module, "rms_norm"):
            monkeypatch.setattr(module, "rms_norm", lambda x, weight, eps: x * weight)
    with pytest.raises(AssertionError):
        check_parity(drafter, tiny.target)


def test_registry_lists_the_built_in_kinds_and_refuses_an_unknown_one():
    from specdistill.distill.errors import UserError

    assert {"eagle1", "eagle3"} <= set(FEATURE_KINDS)
    with pytest.raises(UserError, match="drafter.kind: unknown drafter kind 'eagle9'; known kinds: .*eagle1"):
        drafter_kind("eagle9")


def run_with_plugin(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`specdistill <args>` from a user's script that first imports its own kind module (tests/kinds/copy_last.py)."""
    script = "import tests.kinds.copy_last; from specdistill.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_a_new_kind_is_one_module_and_one_config_file(tiny, toy_dataset, tmp_path: Path):
    check_parity(build_copy_last(tiny.target), tiny.target)
    searchpath = f"hydra.searchpath=[file://{KINDS_DIR / 'conf'}]"
    trained = run_with_plugin("train", "drafter=copy_last", searchpath, f"data_dir={toy_dataset[0]}",
                              f"out_dir={tmp_path / 'train'}", "train.max_steps=30", "train.eval_every=30",
                              *TRAIN_FAST, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "drafter" / "summary.json").read_text())
    assert summary["history"][-1]["val_top1"] > summary["history"][0]["val_top1"]  # it learned
    config = json.loads((tmp_path / "train" / "drafter" / "config.json").read_text())
    assert config["model_type"] == "test_copy_last" and config["feature_layers"] == [1]
    evaluated = run_with_plugin("eval", "target=toy_tiny", "bench=toy", "eval.num_prompts=3", "eval.max_new_tokens=24",
                                "eval.warmup_prompts=0", "eval.verify_lossless=true", "eval.hf_baselines=false",
                                f"drafter_path={tmp_path / 'train' / 'drafter'}", f"out_dir={tmp_path / 'eval'}",
                                cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    report = report[0] if isinstance(report, list) else report
    assert report["lossless_check"] == "passed" and report["method"] == "chain"


def build_copy_last(target) -> FeatureDrafter:
    import tests.kinds.copy_last  # noqa: F401  (registers the kind)

    return build("copy_last", target)
