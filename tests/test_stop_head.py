"""drafter.stop_head (SpecDec++) and eval.draft_length=learned: the stop head trains beside a drafter that trains
exactly as without it, is recorded in config.json and left out of engine exports; a chain cut by its estimates
decodes exactly as plain decoding (greedy) and keeps the target's distribution (sampling); the settings that cannot
work fail with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters import drafter_kind, load_drafting
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.drafters.token_lm import LMDrafting
from specdistill.distill.errors import UserError
from specdistill.train import train as train_module  # registers the train schema for `compose`
from tests.conftest import EAGLE3_FAST, TRAIN_FAST, compose
from tests.test_decoding import assert_sampled_output_has_the_target_distribution, plain_outputs

SHORT = [*TRAIN_FAST, "drafter=eagle3", "objective=eagle3", *EAGLE3_FAST, "drafter.feature_layers=[0,1]",
         "train.max_steps=6", "train.eval_every=6",
         "train.tau_prompts=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def stop_head_runs(toy_dataset, tmp_path_factory):
    """The same short EAGLE-3 run without and with a stop head: {False: drafter folder, True: drafter folder}."""
    dataset, _ = toy_dataset
    root = tmp_path_factory.mktemp("stop_head")
    return {stop: train_module.train(compose("train", [*SHORT, f"drafter.stop_head={str(stop).lower()}",
                                                       f"data_dir={dataset}", f"out_dir={root / str(stop)}"]))
            for stop in (False, True)}


def test_the_stop_head_trains_beside_an_unchanged_drafter(stop_head_runs):
    plain, headed = (load_file(str(stop_head_runs[stop] / "model.safetensors")) for stop in (False, True))
    assert set(headed) - set(plain) == {"stop_head.weight", "stop_head.bias"}
    for name, weight in plain.items():  # detached inputs: the drafter's own weights train exactly as without it
        assert torch.equal(headed[name], weight), name
    assert json.loads((stop_head_runs[True] / "config.json").read_text())["stop_head"] is True
    history = json.loads((stop_head_runs[True] / "summary.json").read_text())["history"]
    bce = [record["stop_bce"] for record in history if "stop_bce" in record]
    assert len(bce) == 6 and all(0 < value < 2 for value in bce), bce
    assert not any("stop_bce" in record
                   for record in json.loads((stop_head_runs[False] / "summary.json").read_text())["history"])


def test_engine_exports_leave_the_stop_head_out(stop_head_runs, tiny):
    drafting = load_drafting(str(stop_head_runs[True]), tiny.target, "cpu")
    assert drafting.has_stop_head
    unit = drafter_kind("eagle3")
    drafter = unit.model_class.from_pretrained(stop_head_runs[True])
    for format in ("vllm", "speculators"):
        assert not any(name.startswith("stop_head") for name in drafter.engine_layout(format, gamma=3).tensors)


def test_learned_draft_length_greedy_equals_plain_decoding(stop_head_runs, tiny):
    """Greedy output is plain decoding's at any threshold; 0 never stops a chain, 1 always stops after one token
    (the product of estimates below 1), so the rule reads the head."""
    proposer = load_drafting(str(stop_head_runs[True]), tiny.target, "cpu")
    prompts = tiny.prompts[:3]
    expected = plain_outputs(tiny.target, prompts, DecodingConfig(method="chain", gamma=4, max_new_tokens=24))
    for threshold, lengths in ((0.0, {4}), (0.5, None), (1.0, {1})):
        config = DecodingConfig(method="chain", gamma=4, max_new_tokens=24, draft_length="learned",
                                draft_threshold=threshold)
        decoder = Decoder(tiny.target, proposer, config)
        drafted = set()
        for prompt, plain in zip(prompts, expected):
            generation = decoder.generate(prompt)
            assert generation.output_ids == plain, threshold
            drafted.update(generation.draft_lengths)
        assert lengths is None or drafted == lengths, (threshold, drafted)


def test_settings_that_cannot_work_fail_with_one_line(tiny):
    config = DecodingConfig(method="chain", gamma=3, draft_length="learned")
    with pytest.raises(UserError, match=r"^eval\.draft_length=learned reads the drafter's stop head, and this drafter "
                                        r"\(LMDrafting\) has none: train it with drafter\.stop_head=true"):
        Decoder(tiny.target, LMDrafting(tiny.model, "cpu"), config)
    for kind, options in (("peagle", {"feature_layers": [0, 1, -1], "draft_vocab_size": 512}),
                          ("dflash", {"feature_layers": [1, -1], "block_size": 4}), ("medusa", {})):
        unit = drafter_kind(kind)
        with pytest.raises(UserError, match=rf"^drafter\.stop_head=true: a {kind} drafter does not draft one token"):
            unit.model_class.build(unit.options(stop_head=True, **options), BuildContext(tiny.target))


class EstimatingLM(LMDrafting):
    """A token-level drafter with a stand-in stop head: its estimate is the top probability of the logits it
    returned last (at T = 1, whatever the decoding temperature), enough for the rule to cut chains at varying depths."""

    has_stop_head = True

    def _run(self, tokens, positions, mask, last_only):
        self.last_logits = super()._run(tokens, positions, mask, last_only)
        return self.last_logits

    def acceptance(self) -> float:
        return float(torch.softmax(self.last_logits[-1].float(), dim=-1).max())


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)], ids=["T1", "T0.7-top-p"])
def test_a_chain_cut_by_learned_estimates_keeps_the_target_distribution(temperature, top_p):
    """test_decoding's G-test (joint distribution of 3 sampled tokens, chi-square at p = 0.001) with chains the
    learned rule cuts at one or two tokens."""
    config = DecodingConfig(method="chain", gamma=2, temperature=temperature, top_p=top_p, max_new_tokens=3,
                            draft_length="learned", draft_threshold=0.7)
    assert_sampled_output_has_the_target_distribution(config, EstimatingLM)
