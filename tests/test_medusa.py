"""Medusa (`drafter=medusa`): head k's training and decoding forwards agree, its loss is the published one (soft CE
against the target's distribution of token t+2+k, weighted 0.8^k), untrained heads start as the target's LM head,
the drafter saves and reloads, decodes losslessly (greedy and sampled), and trains and evaluates through the CLI,
which refuses a draft deeper than the number of heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from specdistill.distill.drafters import load_drafting
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.drafters.medusa import MedusaDrafter, MedusaDrafting, MedusaOptions
from specdistill.distill.errors import UserError
from specdistill.distill.objectives import MedusaObjective
from specdistill.distill.target import FrozenTarget
from specdistill.distill.decoding import Decoder, DecodingConfig
from tests.conftest import TRAIN_FAST, run_cli
from tests.test_decoding import CHAIN, TREE, chi_square_test, exact_joint, plain_outputs, random_lm, sampled_joint_counts

EVAL = ["target=toy_tiny", "bench=toy", "eval.num_prompts=2", "eval.max_new_tokens=16", "eval.warmup_prompts=0"]


def build(target: FrozenTarget, noise: float = 0.0, **options) -> MedusaDrafter:
    """A fresh drafter; `noise` > 0 perturbs every weight (zero-initialised ones included), so a dropped op shows."""
    torch.manual_seed(0)
    drafter = MedusaDrafter.build(MedusaOptions(**options), BuildContext(target))
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    return drafter


def random_tokens(target: FrozenTarget, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(3, target.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_module_names_are_readable(tiny):
    names = set(build(tiny.target).state_dict())
    assert {"heads.0.blocks.0.linear.weight", "heads.0.blocks.0.linear.bias", "heads.4.lm_head.weight"} <= names
    assert not any("heads.5" in name or "lm_head.bias" in name for name in names)


def test_training_and_decoding_heads_agree(tiny):
    """Head k's training logits at position t == the drafting's logits at depth k + 1 once it has read h_t, after
    `begin` and after an `extend` (the same row for every token fed at that depth)."""
    drafter = build(tiny.target, noise=0.1).eval()
    tokens = random_tokens(tiny.target, (1, 14), seed=1)
    with torch.no_grad():
        hidden = tiny.target(tokens, feature_layers=(-1,)).features[-1]
        expected = drafter(hidden)[0]  # [T, heads, V]
        drafting = drafter.drafting("cpu")
        assert isinstance(drafting, MedusaDrafting) and drafting.max_depth == 5 and drafting.feature_layers == (-1,)
        prefix = 8  # the prompt is tokens[:8]; the target ran positions 0..7 and chose tokens[8]
        first = drafting.begin(tokens[:, :prefix], {-1: hidden[:, :prefix]}, tokens[:, prefix : prefix + 1])
        assert_heads_match(drafting, first, expected[prefix - 1])
        assert drafting.length == prefix
        # a step accepted 2 drafts: the target ran positions 8..10 and chose tokens[11]
        after = drafting.extend(tokens[:, prefix + 1 : prefix + 4], {-1: hidden[:, prefix : prefix + 3]})
        assert_heads_match(drafting, after, expected[prefix + 2])
        assert drafting.length == prefix + 3


def assert_heads_match(drafting: MedusaDrafting, first: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(first, expected[0], atol=1e-4, rtol=1e-4)
    for depth in range(1, drafting.max_depth):
        fed = torch.tensor([5, 9, 5])  # three tree nodes at this depth: each gets head `depth`'s row
        logits = drafting.step(fed, torch.tensor([0, 0, 1]), depth, torch.eye(3, dtype=torch.bool))
        assert logits.shape == (3, expected.shape[-1])
        for row in logits:
            torch.testing.assert_close(row, expected[depth], atol=1e-4, rtol=1e-4)


def test_loss_is_the_decayed_soft_cross_entropy_of_every_head_and_trains_only_the_heads(tiny):
    drafter = build(tiny.target, noise=0.1).train()
    input_ids = random_tokens(tiny.target, (2, 16), seed=2)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = (torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(3)) < 0.7).long()
    output = tiny.target(input_ids, attention_mask, feature_layers=(-1,), for_training=True)
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, MedusaObjective())

    # the reference: every head at every position, then masked where token t+2+k is trained
    with torch.no_grad():
        logits = drafter(output.features[-1]).float()  # [B, T, heads, V]
    length, expected, agree, counted = input_ids.shape[1], 0.0, [], []
    for k in range(5):
        rows = length - 2 - k
        draft, target = logits[:, :rows, k], output.logits[:, 1 + k : 1 + k + rows].float()
        per_position = -(target.softmax(-1) * draft.log_softmax(-1)).sum(-1)
        trained = loss_mask[:, 2 + k :].bool()
        expected += 0.8**k * per_position[trained].sum()
        agree.append((draft.argmax(-1) == target.argmax(-1))[trained].sum().item())
        counted.append(trained.sum().item())
    torch.testing.assert_close(loss.loss_sum, expected, atol=1e-4, rtol=1e-5)
    assert loss.agree.tolist() == agree and loss.counted.tolist() == counted
    assert loss.num_tokens == counted[0] == drafter.trained_rows(loss_mask).sum()

    loss.loss_sum.backward()
    for name, parameter in drafter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in tiny.target.parameters())


def test_untrained_heads_are_the_target_lm_head(tiny):
    """Zero residual blocks and a copied LM head: every untrained head predicts what the target predicts for the
    next token (t+1), not for the token it is trained on (t+2+k)."""
    drafter = build(tiny.target)
    output = tiny.target(random_tokens(tiny.target, (1, 10), seed=4), feature_layers=(-1,))
    with torch.no_grad():
        logits = drafter(output.features[-1])
    for k in range(drafter.config.num_heads):
        torch.testing.assert_close(logits[:, :, k], output.logits, atol=1e-5, rtol=1e-5)


def test_save_pretrained_reloads_through_auto_model_and_the_registry(tiny, tmp_path: Path):
    drafter = build(tiny.target, noise=0.1, num_heads=3, num_residual_layers=2)
    drafter.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MedusaDrafter) and loaded.identity() == drafter.identity()
    hidden = tiny.target(random_tokens(tiny.target, (1, 6), seed=5), feature_layers=(-1,)).features[-1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden), drafter(hidden))
    drafting = load_drafting(str(tmp_path), tiny.target, "cpu")
    assert isinstance(drafting, MedusaDrafting) and drafting.max_depth == 3
    config = DecodingConfig(method="chain", gamma=3, max_new_tokens=24)
    expected = plain_outputs(tiny.target, tiny.prompts[:2], config)
    assert [Decoder(tiny.target, drafting, config).generate(p).output_ids for p in tiny.prompts[:2]] == expected


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
def test_greedy_equals_plain_decoding(tiny, config):
    decoder = Decoder(tiny.target, build(tiny.target, noise=0.02).drafting("cpu"), config)
    for prompt, plain in zip(tiny.prompts, plain_outputs(tiny.target, tiny.prompts, config)):
        generation = decoder.generate(prompt)
        assert generation.output_ids == plain
        assert sum(generation.accept_lengths) + 1 == len(plain)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_heads": 0}, r"^drafter\.num_heads=0: .*set drafter\.num_heads ≥ 1$"),
    ({"feature_layers": [1]}, r"^drafter\.feature_layers=\[1\]: .*final normed hidden state"),
    ({"num_layers": 2}, r"^drafter\.num_layers=2: .*set drafter\.num_residual_layers"),
], ids=str)
def test_options_medusa_cannot_honour_are_refused(tiny, options, message):
    with pytest.raises(UserError, match=message):
        build(tiny.target, **options)


def test_a_non_positive_head_decay_is_refused():
    with pytest.raises(UserError, match=r"^objective\.head_decay=-0\.5: must be a number > 0"):
        MedusaDrafter.check_objective(MedusaObjective(head_decay=-0.5))


@pytest.mark.parametrize(("method", "key"), [("chain", "gamma"), ("tree", "tree_depth")])
def test_a_draft_deeper_than_the_heads_is_refused(tiny, method, key):
    config = DecodingConfig(method=method, gamma=4, tree_depth=4)
    with pytest.raises(UserError, match=rf"^eval\.{key}=4: .* at most 3 .* set eval\.{key} ≤ 3$"):
        Decoder(tiny.target, build(tiny.target, num_heads=3).drafting("cpu"), config)


def test_tau_during_training_refuses_a_draft_deeper_than_the_heads_as_eval_does(tiny):
    """One policy: train.tau's decoding is refused (never capped) past the heads, naming the train.tau key."""
    from specdistill.train.live_tau import decode_counts

    drafter = build(tiny.target, num_heads=3)
    assert drafter.max_depth == 3 and drafter.drafting("cpu").max_depth == 3
    with pytest.raises(UserError, match=r"^train\.tau\.gamma=5: .* at most 3 tokens .* set train\.tau\.gamma ≤ 3$"):
        decode_counts(drafter.drafting("cpu"), tiny.target, tiny.prompts[:1], DecodingConfig(), set(), seed=0)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "config",
    [DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3),
     pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=1.0,
                                 max_new_tokens=3), marks=pytest.mark.slow)],
    ids=["chain", "tree"],
)
def test_sampled_speculative_output_has_the_target_distribution(config):
    """tests/test_decoding.py's check with Medusa heads drafting: the joint distribution of 3 sampled tokens on a
    5-token vocabulary matches the target's exactly computed one (chi-square at p = 0.001, fixed seed)."""
    target = FrozenTarget(random_lm(scale=60.0))
    drafter = build(target, noise=0.3, num_heads=2).eval()  # accepted about 17% (chain) and 44% (tree)
    prompt, draws = [1, 2, 3], 3000
    exact = exact_joint(target.model, prompt, 3, config.temperature, config.top_p).flatten()
    counts, acceptance = sampled_joint_counts(Decoder(target, drafter.drafting("cpu"), config), prompt, draws)
    assert 0.1 < acceptance < 0.9, "drafts must be accepted and rejected often, or the test proves little"
    statistic, critical = chi_square_test(counts, exact)
    assert statistic < critical


@pytest.mark.slow
def test_medusa_trains_and_decodes_losslessly_through_the_cli(toy_dataset, tmp_path: Path):
    # a high learning rate, so that 20 steps make drafts the target accepts (τ > 1 tests the commits after accepts)
    fast = [arg for arg in TRAIN_FAST if not arg.startswith("optim.lr=")] + ["optim.lr=2e-2"]
    trained = run_cli("train", "drafter=medusa", f"data_dir={toy_dataset[0]}", f"out_dir={tmp_path / 'train'}",
                      *fast, "train.max_steps=20", "train.eval_every=20", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    drafter = tmp_path / "train" / "drafter"
    history = json.loads((drafter / "summary.json").read_text())["history"]
    validated = {h["step"]: [round(h[f"val_top1_step{k}"], 3) for k in range(5)] for h in history if "val_top1" in h}
    print("medusa val_top1 per head", validated)
    assert history[-1]["val_top1"] > history[0]["val_top1"] + 0.05  # it learned
    assert json.loads((drafter / "config.json").read_text())["num_heads"] == 5

    for name, method in (("chain", []), ("tree", ["eval.method=tree", "eval.tree_depth=3", "eval.tree_top_k=3",
                                                   "eval.tree_total_tokens=10"])):
        evaluated = run_cli("eval", *EVAL, f"drafter_path={drafter}", *method, f"out_dir={tmp_path / name}",
                            cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        report = json.loads((tmp_path / name / "report.json").read_text())["rows"][0]  # then transformers generate
        print(name, "medusa tau", round(report["tau"], 3), "alpha", report["alpha_per_position"])
        assert report["method"] == name and report["lossless_check"] == "passed" and report["tau"] > 1.1
        assert report["lossless_check_method"] == "greedy output equals plain decoding"

    refused = run_cli("eval", *EVAL, f"drafter_path={drafter}", "eval.gamma=6", f"out_dir={tmp_path / 'deep'}",
                      cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: eval.gamma=6: this drafter (MedusaDrafting) drafts at most 5 tokens per step; set eval.gamma ≤ 5")
    assert not (tmp_path / "deep" / "report.json").exists()
