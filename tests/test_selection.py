"""Online drafter selection (eval.selection=hedge, distill/selection.py): the acceptance score each drafter gets, the
leader it picks, and losslessness while the leader changes: greedy output equals plain decoding (chain and tree,
feature, token-level and parallel members), sampled output keeps the target's distribution (G-test), and the report
row with its regret against the best fixed drafter per category."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters.token_lm import LMDrafting
from specdistill.distill.drafting import Drafting
from specdistill.distill.errors import UserError
from specdistill.distill.selection import HedgeDrafting, acceptance
from specdistill.distill.target import FrozenTarget
from specdistill.eval.eval import HEDGE, evaluate
from tests.conftest import compose, random_drafter
from tests.test_decoding import CHAIN, TREE, chi_square_test, exact_joint, plain_outputs, random_lm, sampled_joint_counts


def test_acceptance_is_the_overlap_of_the_two_distributions_or_the_argmax_match_when_greedy():
    target, draft = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 2.0])
    p, q = torch.softmax(target, -1), torch.softmax(draft, -1)
    assert acceptance(target, draft, 1.0, 1.0) == pytest.approx(float(torch.minimum(p, q).sum()))
    assert acceptance(target, target, 0.7, 0.8) == pytest.approx(1.0)
    assert acceptance(target, draft, 0.0, 1.0) == 0.0 and acceptance(target, target * 3, 0.0, 1.0) == 1.0
    # top-p applies to both: at top-p 0.5 each keeps its own argmax only, and those differ
    assert acceptance(target, draft, 1.0, 0.5) == 0.0


class FixedDrafting(Drafting):
    """A stand-in member whose next-token logits are set by the test (no model)."""

    def __init__(self):
        super().__init__("cpu")
        self.logits = torch.zeros(3)

    def begin(self, prompt_ids, features, first_token):
        return self.logits

    def extend(self, tokens, features):
        return self.logits

    def step(self, tokens, parents, depth, block):
        return self.logits.expand(len(tokens), -1)


TOKEN = torch.zeros(1, 1, dtype=torch.long)  # what a step commits (FixedDrafting ignores it)


def test_a_prompt_starts_from_the_streams_prior_worth_prior_steps_steps():
    good, lucky = FixedDrafting(), FixedDrafting()
    right, wrong = torch.tensor([0.0, 5.0, 0.0]), torch.tensor([5.0, 0.0, 0.0])
    target = right  # the target wants token 1 at every step

    def step(hedge: HedgeDrafting, good_logits: torch.Tensor, lucky_logits: torch.Tensor, begin: bool = False):
        """The members predict, then the step is verified and scored."""
        good.logits, lucky.logits = good_logits, lucky_logits
        hedge.begin(None, {}, None) if begin else hedge.extend(TOKEN, {})
        hedge.observe(target, 0.0, 1.0)

    hedge = HedgeDrafting({"good": good, "lucky": lucky}, "cpu", prior_steps=4)
    step(hedge, right, wrong, begin=True)  # a first prompt: good right 10 times in 10, lucky once
    for _ in range(8):
        step(hedge, right, wrong)
    step(hedge, right, right)
    good.logits = lucky.logits = right
    hedge.begin(None, {}, None)  # a new prompt: a prior of 4 steps at the stream's mean losses, 0 and 9/10
    assert hedge.leader == "good"
    assert hedge.prior == {"good": (4, 0.0), "lucky": (4, pytest.approx(0.9))}
    hedge.observe(target, 0.0, 1.0)
    step(hedge, wrong, right)  # one unlucky step for good does not hand lucky the prompt
    assert hedge.leader == "good"
    for _ in range(3):  # but a prompt where lucky is truly better does, within about prior_steps steps
        step(hedge, wrong, right)
    hedge.extend(TOKEN, {})
    assert hedge.leader == "lucky"
    # without a prior (the paper's per-query reset) one step decides
    afresh = HedgeDrafting({"good": good, "lucky": lucky}, "cpu", prior_steps=0)
    afresh.stream_acceptance, afresh.stream_scored = {"good": 9.0, "lucky": 1.0}, {"good": 10, "lucky": 10}
    step(afresh, wrong, right, begin=True)
    assert afresh.leader == "good"  # the best so far starts the prompt
    afresh.extend(TOKEN, {})
    assert afresh.leader == "lucky"


def members(target: FrozenTarget, model) -> dict[str, object]:
    """A poor untrained EAGLE-3, a parallel DFlash and, listed last, the target itself as a token-level drafter
    (always right at greedy), so the leader must move off the first listed to the last."""
    return {"eagle3": random_drafter("eagle3", target, draft_vocab_size=512).drafting("cpu"),
            "dflash": random_drafter("dflash", target, feature_layers=[1, -1], block_size=6).drafting("cpu"),
            "target": LMDrafting(model, "cpu")}


@pytest.mark.parametrize(("config", "score_every"), [(CHAIN, 1), (TREE, 1), (CHAIN, 3)],
                         ids=["chain", "tree", "chain-score-every-3"])
def test_greedy_hedge_equals_plain_decoding_and_follows_the_best_drafter(tiny, config, score_every):
    hedge = HedgeDrafting(members(tiny.target, tiny.model), "cpu", score_every=score_every)
    commits = []  # every member's commit forwards after the prompt's first
    catch_up = hedge._catch_up
    hedge._catch_up = lambda name: commits.append(name) or catch_up(name)
    assert set(hedge.feature_layers) == {0, 1, -1}  # every member's taps reach it
    decoder = Decoder(tiny.target, hedge, config)
    expected = plain_outputs(tiny.target, tiny.prompts, config)
    generations = [decoder.generate(prompt) for prompt in tiny.prompts]
    assert [generation.output_ids for generation in generations] == expected
    summary = hedge.summary()
    # the first step drafts with the first listed; after one scored step the target copy leads, and stays ahead
    assert summary["target"]["lead_fraction"] > 0.9 and summary["eagle3"]["lead_fraction"] > 0
    assert summary["target"]["first_position_acceptance"] == 1.0
    assert summary["eagle3"]["first_position_acceptance"] < 0.5
    steps = sum(len(generation.accept_lengths) for generation in generations)
    assert hedge.lead_steps["target"] + hedge.lead_steps["eagle3"] + hedge.lead_steps["dflash"] == steps
    # the leader commits every step, the others every score_every-th (in one forward for the steps held back)
    committing_steps = steps - len(tiny.prompts)  # a prompt's last step ends it without a commit
    assert len(commits) < 2 * committing_steps if score_every > 1 else len(commits) == 3 * committing_steps
    scored = hedge.stream_scored
    assert scored["target"] > scored["eagle3"] if score_every > 1 else len(set(scored.values())) == 1
    # a later prompt drafts with the best drafter so far from its first step
    hedge.reset_statistics()
    assert decoder.generate(tiny.prompts[0]).output_ids == expected[0]
    assert hedge.summary()["target"]["lead_fraction"] == 1.0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "config",
    [DecodingConfig(method="chain", gamma=2, temperature=0.7, top_p=0.8, max_new_tokens=3),
     pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=1.0,
                                 max_new_tokens=3), marks=pytest.mark.slow)],
    ids=["chain-T0.7-top-p", "tree"],
)
def test_hedge_keeps_the_target_distribution_while_the_leader_changes(config):
    """The G-test of test_decoding with two token-level drafters, each better than the other after some first
    tokens, so the leader changes within generations (b drafts ~15 % of the steps); the one not leading commits every
    second step, so a new leader sometimes catches up before drafting."""
    target_model = random_lm(scale=60.0)
    prompt, draws = [1, 2, 3], 4000
    exact = exact_joint(target_model, prompt, 3, config.temperature, config.top_p).flatten()
    hedge = HedgeDrafting({"a": LMDrafting(random_lm(scale=30.0, noise=0.5), "cpu"),
                           "b": LMDrafting(random_lm(scale=30.0, noise=0.8, noise_seed=13), "cpu")}, "cpu",
                          score_every=2)
    counts, acceptance_rate = sampled_joint_counts(Decoder(FrozenTarget(target_model), hedge, config), prompt, draws)
    assert 0.2 < acceptance_rate < 0.9, "drafts must be accepted and rejected often, or the test proves little"
    shares = hedge.summary()
    assert all(0.05 < stats["lead_fraction"] < 0.95 for stats in shares.values()), shares  # both drafted often
    statistic, critical = chi_square_test(counts, exact)
    assert statistic < critical


def test_eval_adds_a_hedge_row_with_its_regret_per_category(tmp_path: Path, target, toy_tiny_path: Path):
    eagle3, token_lm = tmp_path / "eagle3", tmp_path / "token_lm"
    random_drafter("eagle3", target, target_name_or_path="toy_tiny", draft_vocab_size=512).save_pretrained(
        eagle3, safe_serialization=True)
    shutil.copytree(toy_tiny_path, token_lm)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "category": "code", "prompt": "def add(a, b):"},
        {"id": "b", "category": "imports", "prompt": "import os\n"},
        {"id": "c", "category": "code", "prompt": "class Stack:"}]))
    overrides = ["target=toy_tiny", "bench=local", f"bench.path={bench}", "eval.max_new_tokens=24",
                 "eval.warmup_prompts=0", "eval.verify_lossless=true", "eval.hf_baselines=false",
                 f"out_dir={tmp_path / 'out'}"]
    report = evaluate(compose("eval", [*overrides, f"drafter_path=[{eagle3},{token_lm}]", "eval.selection=hedge"]))
    rows = {row["drafter"]: row for row in report["rows"]}
    assert list(rows) == [str(eagle3), str(token_lm), HEDGE]
    hedge = rows[HEDGE]
    assert hedge["lossless_check"] == "passed"
    selection = hedge["selection"]
    assert selection["best_fixed"] == str(token_lm) and set(selection["regret_per_category"]) == {"code", "imports"}
    for category, stats in selection["regret_per_category"].items():
        assert stats["oracle"] == str(token_lm)
        assert stats["tau"] == hedge["per_category"][category]["tau"]
        assert stats["regret"] == pytest.approx((stats["oracle_tau"] - stats["tau"]) / stats["oracle_tau"])
    # only the first prompt's first step drafts with the untrained EAGLE-3 (listed first): one step of ~13 is lost
    steps = sum(hedge["accept_length_histogram"])
    assert selection["members"][str(eagle3)]["lead_fraction"] == pytest.approx(1 / steps)
    assert 0 < selection["regret_overall"] < 0.1
    assert "## Online drafter selection (HedgeSpec)" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(UserError, match=r"eval.selection=hedge chooses among several drafters, but drafter_path "
                                        r"names 1"):
        evaluate(compose("eval", [*overrides, f"drafter_path={token_lm}", "eval.selection=hedge", "overwrite=true"]))
