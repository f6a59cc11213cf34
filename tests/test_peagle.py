"""P-EAGLE (distill/drafters/peagle.py): COD sampling, the training layout's chains kept apart, the mask token, one
drafter call per round, and its export for vLLM (the parity and lossless checks of every kind cover it elsewhere:
test_drafter_units.py, test_decoding.py)."""

from __future__ import annotations

import json

import pytest
import torch

from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters import drafter_kind
from specdistill.distill.drafters.feature import BuildContext, shift_left
from specdistill.distill.drafters.peagle import PEagleObjective, cod_anchors
from specdistill.distill.errors import UserError
from tests.conftest import random_drafter

KIND = drafter_kind("peagle")


def build(target, **options):
    return random_drafter("peagle", target, perturb=0.02, **options)


def test_cod_keeps_r_to_the_d_of_the_positions_nested_down_to_the_floor():
    candidates = torch.zeros(300, dtype=torch.bool)
    candidates[50:250] = True  # 200 trained positions
    anchors = cod_anchors(candidates, depths=8, ratio=0.7, ratio_min=0.2, generator=torch.Generator().manual_seed(0))
    assert [len(depth) for depth in anchors] == [140, 98, 69, 48, 40, 40, 40]  # 200·0.7^d rounded, ≥ 200·0.2
    previous = set(range(50, 250))
    for depth in anchors:
        assert depth.tolist() == sorted(depth.tolist()) and set(depth.tolist()) <= previous  # nested, sorted
        previous = set(depth.tolist())


def test_each_chain_sees_its_own_anchor_only(tiny):
    """The training layout with many anchors per depth (as COD builds it) gives every chain entry exactly what a
    layout holding that anchor alone gives (`training_draft_logits`, which the parity test ties to decoding)."""
    drafter = build(tiny.target)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, tiny.target.config.vocab_size, (1, 14), generator=generator)
    features = tiny.target(tokens, feature_layers=drafter.feature_layers).features
    anchors = [torch.tensor([2, 5, 9]), torch.tensor([5, 9]), torch.tensor([9])]
    with torch.no_grad():
        out = drafter.parallel_forward(shift_left(tokens, 1), drafter.hidden_input(features), torch.ones_like(tokens),
                                       anchors)
        start = tokens.shape[1]
        for depth, chosen in enumerate(anchors, start=1):
            for index, anchor in enumerate(chosen.tolist()):
                ran = {layer: feature[:, : anchor + 1] for layer, feature in features.items()}
                alone = drafter.training_draft_logits(tokens[:, : anchor + 2 + depth], ran, anchor + 1)
                torch.testing.assert_close(drafter.vocab_logits(out[0, start + index]), alone[depth], atol=1e-4,
                                           rtol=1e-4)
            start += len(chosen)


def test_the_loss_reaches_every_depth_and_mask_hidden(tiny):
    drafter = build(tiny.target)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (2, 24), generator=generator)
    attention_mask, loss_mask = torch.ones_like(input_ids), torch.ones_like(input_ids)
    attention_mask[1, 20:], loss_mask[1, 20:] = 0, 0
    output = tiny.target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, PEagleObjective(), generator)
    assert len(loss.counted) == drafter.config.parallel_depths and bool((loss.counted > 0).all())
    assert loss.num_tokens == loss.counted[0] == 22 + 18  # every position whose token two on is trained
    loss.loss_sum.backward()
    assert drafter.mask_hidden.grad is not None and drafter.mask_hidden.grad.abs().sum() > 0


def test_the_mask_token_is_the_tokenizers_else_the_least_used_id(tiny):
    vocab = tiny.target.config.vocab_size
    counts = torch.ones(vocab, dtype=torch.long)
    counts[[7, 11]] = 0
    chosen = KIND.model_class.build(KIND.options(draft_vocab_size=None), BuildContext(tiny.target, token_counts=counts))
    assert chosen.config.mask_token_id == 11  # unused, and the higher of the two
    given = KIND.model_class.build(KIND.options(draft_vocab_size=None),
                                   BuildContext(tiny.target, token_counts=counts, mask_token_id=4))
    assert given.config.mask_token_id == 4
    with pytest.raises(UserError, match=r"drafter.mask_token_id=99999 is out of range: it must be a token id in 0\.\."):
        KIND.model_class.build(KIND.options(mask_token_id=99999), BuildContext(tiny.target))


def test_objective_refuses_a_training_time_test():
    with pytest.raises(UserError, match="objective.ttt_steps=3: P-EAGLE drafts every depth in one forward"):
        KIND.model_class.check_objective(PEagleObjective(ttt_steps=3))


def test_a_round_is_one_drafter_call_and_deeper_than_trained_is_refused(tiny):
    drafter = build(tiny.target, parallel_depths=4)
    config = DecodingConfig(method="chain", gamma=4, max_new_tokens=30)
    generation = Decoder(tiny.target, drafter.drafting("cpu"), config).generate(tiny.prompts[0])
    steps = len(generation.accept_lengths)
    assert generation.drafter_calls in (steps, steps + 1)  # begin, then one extend per round but the last
    with pytest.raises(UserError, match=r"eval.gamma=5: this drafter \(PEagleDrafting\) drafts at most 4 tokens"):
        Decoder(tiny.target, drafter.drafting("cpu"), DecodingConfig(method="chain", gamma=5))


def test_vllm_layout_carries_mask_hidden_in_the_ascending_tap_order_and_the_mask_token(tiny):
    from specdistill.export.export import serve_commands

    drafter = build(tiny.target, feature_layers=[1, 0], draft_vocab_size=None)
    width = drafter.config.target_hidden_size
    layout = drafter.engine_layout("vllm", gamma=3)
    assert layout.config["mask_token_id"] == drafter.config.mask_token_id
    assert layout.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    mask_hidden = drafter.mask_hidden.detach()
    expected = torch.cat([mask_hidden[:, width:], mask_hidden[:, :width]], dim=1)
    assert torch.equal(layout.tensors["mask_hidden"], expected)  # the same permutation as fc's columns
    speculators = drafter.engine_layout("speculators", gamma=3)
    assert speculators.config["speculators_model_type"] == "peagle" and speculators.config["mask_token_id"] >= 0
    command = serve_commands(KIND, "vllm", "target", "drafter", 3)["vllm"]
    assert json.loads(command.split("'")[1]) == {"method": "eagle3", "model": "drafter", "num_speculative_tokens": 3,
                                                 "parallel_drafting": True}
