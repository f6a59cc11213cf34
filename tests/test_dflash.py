"""DFlash (distill/drafters/dflash.py): default taps, blocks kept apart in training, the loss, one drafter call per
round over the whole trained block, and the vLLM layout (parity and lossless checks of every kind: test_drafter_units.py,
test_decoding.py)."""

from __future__ import annotations

import pytest
import torch

from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters import drafter_kind
from specdistill.distill.drafters.dflash import DFlashObjective, default_dflash_layers
from specdistill.distill.drafters.engine_layouts import ExportUnsupported
from specdistill.distill.errors import UserError
from tests.conftest import random_drafter

KIND = drafter_kind("dflash")


def build(target, **options):
    return random_drafter("dflash", target, perturb=0.02, **{"block_size": 6, **options})


def test_default_taps_spread_five_layer_inputs_from_1_to_l_minus_3():
    assert default_dflash_layers(32) == [1, 8, 15, 22, 29]
    assert default_dflash_layers(36) == [1, 9, 17, 25, 33]
    assert default_dflash_layers(6) == [1, 2, 3, 4, 5] and default_dflash_layers(2) == [1]
    with pytest.raises(UserError, match="DFlash taps layer inputs 1..L−1"):
        default_dflash_layers(1)


def test_each_block_sees_its_own_context_and_block_only(tiny):
    drafter = build(tiny.target)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, tiny.target.config.vocab_size, (1, 16), generator=generator)
    features = tiny.target(tokens, feature_layers=drafter.feature_layers).features
    anchors = torch.tensor([0, 3, 4, 9])
    with torch.no_grad():
        together = drafter.block_forward(tokens[:, anchors], anchors, drafter.context_states(features),
                                         torch.ones_like(tokens))
        for index, anchor in enumerate(anchors.tolist()):
            alone = drafter.training_draft_logits(tokens[:, : anchor + 5], features, anchor)
            torch.testing.assert_close(drafter.vocab_logits(together[0, index, 1:]), alone, atol=1e-4, rtol=1e-4)


def test_the_loss_counts_block_positions_and_trains_the_drafter(tiny):
    drafter = build(tiny.target)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, tiny.target.config.vocab_size, (2, 20), generator=generator)
    attention_mask, loss_mask = torch.ones_like(input_ids), torch.ones_like(input_ids)
    attention_mask[1, 15:], loss_mask[1, 15:] = 0, 0
    output = tiny.target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, DFlashObjective(max_anchors=64),
                                 generator)
    assert loss.num_tokens == 19 + 14  # the normaliser: every trained token after the first
    # every anchor (19 candidates) × rows whose predicted token is trained: block position k of anchor a counts where
    # a + k < 20 (row 0) and a + k < 15 (row 1)
    expected = [sum(1 for a in range(19) if a + k < 20) + sum(1 for a in range(19) if a + k < 15) for k in range(1, 6)]
    assert loss.counted.tolist() == expected
    loss.loss_sum.backward()
    assert drafter.fc.weight.grad.abs().sum() > 0 and drafter.layers[0].self_attn.k_norm.weight.grad.abs().sum() > 0


def test_a_round_is_one_call_over_the_whole_block_and_deeper_than_it_is_refused(tiny):
    drafter = build(tiny.target)
    prompt = torch.tensor([tiny.prompts[0]])
    features = tiny.target(prompt, feature_layers=drafter.feature_layers).features
    short, full = drafter.drafting("cpu"), drafter.drafting("cpu")
    short.draft_depth = 2
    first = prompt[:, -1:]
    with torch.no_grad():
        short.begin(prompt[:, :-1], {k: v[:, :-1] for k, v in features.items()}, first)
        full.begin(prompt[:, :-1], {k: v[:, :-1] for k, v in features.items()}, first)
    torch.testing.assert_close(short.round_logits[:2], full.round_logits[:2])  # γ only picks rows of the same block
    config = DecodingConfig(method="chain", gamma=4, max_new_tokens=30)
    generation = Decoder(tiny.target, drafter.drafting("cpu"), config).generate(tiny.prompts[0])
    assert generation.drafter_calls in (len(generation.accept_lengths), len(generation.accept_lengths) + 1)
    with pytest.raises(UserError, match=r"eval.gamma=6: this drafter \(DFlashDrafting\) drafts at most 5 tokens"):
        Decoder(tiny.target, drafter.drafting("cpu"), DecodingConfig(method="chain", gamma=6))


def test_vllm_layout_names_layer_outputs_and_ships_no_target_weights(tiny):
    drafter = build(tiny.target, feature_layers=[1])
    layout = drafter.engine_layout("vllm", gamma=5)
    assert layout.config["architectures"] == ["DFlashDraftModel"]
    assert layout.config["dflash_config"] == {"mask_token_id": drafter.config.mask_token_id, "target_layer_ids": [0],
                                              "block_size": 6, "causal": False}
    names = set(layout.tensors)
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_norm.weight",
            "layers.0.self_attn.k_norm.weight", "layers.0.mlp.gate_proj.weight"} <= names
    assert not any(name.startswith(("embed_tokens", "lm_head", "mask_hidden")) for name in names)
    with pytest.raises(ExportUnsupported, match="taps layer 0's input"):
        build(tiny.target, feature_layers=[0, 1]).engine_layout("vllm", gamma=5)


def test_objective_and_block_size_are_checked(tiny):
    with pytest.raises(UserError, match="DFlash has no feature loss and no training-time test"):
        KIND.model_class.check_objective(DFlashObjective(ttt_steps=2))
    with pytest.raises(UserError, match="drafter.block_size=1 is out of range"):
        build(tiny.target, block_size=1)
