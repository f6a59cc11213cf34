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
from specdistill.distill.drafters import drafter_kind, kind_of_folder, registered_kinds
from specdistill.distill.drafters.feature import FeatureDrafter
from specdistill.distill.drafters.modules import causal_bias
from tests.conftest import REPO_ROOT, TRAIN_FAST, random_drafter

KINDS_DIR = Path(__file__).parent / "kinds"
KINDS = [kind.name for kind in registered_kinds()]  # every kind, through the registry: none is left out
PROMPT = 8  # positions the target has run when drafting starts


def build(kind: str, target, **options):
    """An untrained drafter of `kind` with every weight randomised (norms in 0.5..1.5; zero-initialised weights, e.g.
    Medusa's blocks, made nonzero so its heads differ), so a dropped or misplaced op shows."""
    return random_drafter(kind, target, perturb=0.02, **options)


def training_logits(drafter: FeatureDrafter, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The training forward over a whole sequence of (t_{i+1}, h_i) pairs, causal → logits of every position."""
    positions = torch.arange(tokens.shape[1])[None]
    bias = causal_bias(torch.ones_like(tokens), hidden.dtype)
    return drafter.training_step(tokens, hidden, positions, bias, with_logits=True)[1][0]


def check_parity(drafter, target) -> None:
    """The decoding forward (the kind's `drafting`, driven as the evaluator's decoder drives it) equals the training
    forward (the kind's `training_draft_logits`) on the prefill; on a round (a tree level of two siblings, then a
    child of the first); and, after a partial accept (the first sibling and the target's bonus token committed, the
    other drafts rolled back), on the next round (a chain of two)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, target.config.vocab_size, (1, PROMPT + 6), generator=generator)[0]
    sibling, stray = (tokens[PROMPT + 1 : PROMPT + 3] + 1) % target.config.vocab_size  # drafts the target rejects
    with torch.no_grad():
        features = target(tokens[None], feature_layers=drafter.feature_layers).features
        drafting = drafter.drafting("cpu")

        def expected(committed: int, *drafts: torch.Tensor) -> torch.Tensor:
            """The training forward's logits after tokens[: committed + 1] (the target ran `committed` positions),
            then each of `drafts`."""
            sequence = torch.cat([tokens[: committed + 1], torch.stack(drafts)]) if drafts else tokens[: committed + 1]
            ran = {layer: feature[:, :committed] for layer, feature in features.items()}
            return drafter.training_draft_logits(sequence[None], ran, committed)

        def close(actual: torch.Tensor, wanted: torch.Tensor) -> None:
            torch.testing.assert_close(actual, wanted, atol=1e-4, rtol=1e-4)

        p, first = PROMPT, tokens[PROMPT + 1]
        prompt_features = {layer: feature[:, :p] for layer, feature in features.items()}
        close(drafting.begin(tokens[None, :p], prompt_features, tokens[None, p : p + 1]), expected(p)[0])
        level = drafting.step(torch.stack([first, sibling]), torch.tensor([-1, -1]), depth=1,
                              block=torch.eye(2, dtype=torch.bool))
        close(level[0], expected(p, first)[1])
        close(level[1], expected(p, sibling)[1])
        child = drafting.step(stray[None], torch.tensor([0]), depth=2, block=torch.tensor([[True, False, True]]))
        close(child[0], expected(p, first, stray)[2])
        # the target accepts `first` and adds its own token p + 2, having run positions p and p + 1
        ran = {layer: feature[:, p : p + 2] for layer, feature in features.items()}
        close(drafting.extend(tokens[None, p + 1 : p + 3], ran), expected(p + 2)[0])
        for depth in (1, 2):
            chained = drafting.step(tokens[p + 2 + depth][None], torch.tensor([-1]), depth=depth, block=None)
            close(chained[0], expected(p + 2, *tokens[p + 3 : p + 3 + depth])[depth])


@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
def test_parity_check_fails_when_the_decoding_side_is_off(tiny, kind, monkeypatch):
    """Every kind's decoding forward runs on distill/lean.py's `Linear`: 0.1 % off there must fail the check."""
    drafter = build(kind, tiny.target)
    exact = lean.Linear.__call__
    monkeypatch.setattr(lean.Linear, "__call__", lambda linear, x: exact(linear, x) * 1.001)
    with pytest.raises(AssertionError):
        check_parity(drafter, tiny.target)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_recognises_its_own_folders_only(tiny, kind, tmp_path):
    build(kind, tiny.target).save_pretrained(tmp_path)
    assert kind_of_folder(json.loads((tmp_path / "config.json").read_text()), tmp_path).name == kind


def test_register_kind_refuses_a_second_name_for_a_kind():
    from specdistill.distill.drafters import register_kind
    from specdistill.distill.drafters.eagle1 import Eagle1Config, Eagle1Drafter

    class OtherConfig(Eagle1Config):
        model_type = "specdistill_other"

    class Other(Eagle1Drafter):
        config_class = OtherConfig

    with pytest.raises(ValueError, match="Eagle1Options.kind defaults to 'eagle1'; set it to 'other'"):
        register_kind("other", Other)
    assert "other" not in KINDS and all(kind.name != "other" for kind in registered_kinds())


def test_registry_lists_the_built_in_kinds_and_refuses_an_unknown_one():
    from specdistill.distill.errors import UserError

    assert {"eagle1", "eagle3", "fspad", "medusa", "token_lm"} <= set(KINDS)
    with pytest.raises(UserError, match="drafter.kind: unknown drafter kind 'eagle9'; known kinds: .*eagle1"):
        drafter_kind("eagle9")


def run_with_plugin(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`specdistill <args>` from a user's script that first imports its own kind module (tests/kinds/copy_last.py)."""
    script = "import tests.kinds.copy_last; from specdistill.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.mark.slow
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
    assert config["model_type"] == "specdistill_copy_last" and config["feature_layers"] == [1]
    evaluated = run_with_plugin("eval", "target=toy_tiny", "bench=toy", "eval.num_prompts=3", "eval.max_new_tokens=24",
                                "eval.warmup_prompts=0", "eval.verify_lossless=true", "eval.hf_baselines=false",
                                f"drafter_path={tmp_path / 'train' / 'drafter'}", f"out_dir={tmp_path / 'eval'}",
                                cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    [report] = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert report["lossless_check"] == "passed" and report["method"] == "chain"


def build_copy_last(target) -> FeatureDrafter:
    import tests.kinds.copy_last  # noqa: F401  (registers the kind)

    return build("copy_last", target)
