"""EAGLE drafters: training-time-test attention against an explicit mask, save/reload, losses, vocab, checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from specdistill.distill.drafters.eagle1 import Eagle1Config, Eagle1Drafter
from specdistill.distill.drafters.eagle3 import Eagle3Config, Eagle3Drafter, select_draft_vocab
from specdistill.distill.drafters.feature import check_drafter_matches_target, draft_config_from_target
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.drafters.modules import DraftAttention, causal_bias, rotary_cos_sin
from specdistill.distill.errors import UserError
from specdistill.distill.target import FINAL_NORMED, FrozenTarget


def test_ttt_attention_equals_attention_under_the_explicit_mask():
    torch.manual_seed(0)
    batch, seq, hidden, heads, kv_heads, steps = 2, 5, 16, 4, 2, 3
    attention = DraftAttention(hidden, hidden, heads, kv_heads)
    inputs = [torch.randn(batch, seq, hidden) for _ in range(steps)]
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, -1] = 0  # padding
    bias = causal_bias(attention_mask, torch.float32)
    positions = torch.arange(seq)[None].expand(batch, seq)
    earlier, outputs, all_keys, all_values = [], [], [], []
    for step in range(steps):
        cos, sin = rotary_cos_sin(positions + step, hidden // heads, 10000.0, torch.float32)
        out, (keys, values) = attention(inputs[step], cos, sin, bias, earlier or None)
        earlier.append((keys, values))
        outputs.append(out)
        all_keys.append(keys)
        all_values.append(values)

    # reference: plain softmax attention over the keys of every step with a [seq, steps·seq] mask
    keys, values = torch.cat(all_keys, dim=2), torch.cat(all_values, dim=2)
    for step in range(steps):
        cos, sin = rotary_cos_sin(positions + step, hidden // heads, 10000.0, torch.float32)
        q = attention._heads(attention.q_proj(inputs[step]), heads)
        from specdistill.distill.drafters.modules import apply_rotary

        q = apply_rotary(q, cos, sin)
        visible = torch.zeros(batch, 1, seq, steps * seq, dtype=torch.bool)
        visible[..., :seq] = bias == 0  # step-0 keys: causal, not padding
        for earlier_step in range(1, step + 1):
            visible[..., earlier_step * seq : (earlier_step + 1) * seq] |= torch.eye(seq, dtype=torch.bool)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(hidden // heads)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        expected = attention.o_proj((weights @ values).transpose(1, 2).reshape(batch, seq, -1))
        assert torch.allclose(outputs[step], expected, atol=1e-5), step


TAPS = (0, 1, FINAL_NORMED)


def build(kind: str, target: FrozenTarget):
    if kind == "eagle1":
        drafter = Eagle1Drafter(draft_config_from_target(Eagle1Config, target.config, [FINAL_NORMED]))
    else:
        config = draft_config_from_target(Eagle3Config, target.config, [0, 1, FINAL_NORMED], draft_vocab_size=300)
        drafter = Eagle3Drafter(config)
        drafter.set_draft_vocab(select_draft_vocab(torch.arange(1024), 300, 1024), target.lm_head)
    drafter.attach_target(target)
    return drafter


def batch_of(seq: int = 12):
    torch.manual_seed(3)
    input_ids = torch.randint(5, 1000, (2, seq))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0
    return input_ids, attention_mask, loss_mask


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_saved_drafter_reloads_with_auto_model_and_gives_identical_outputs(kind, target, tmp_path: Path):
    drafter = build(kind, target).eval()
    input_ids, attention_mask, _ = batch_of()
    features = target(input_ids, attention_mask, feature_layers=TAPS).features
    inputs = features[FINAL_NORMED] if kind == "eagle1" else {i: features[i] for i in (0, 1, FINAL_NORMED)}
    before = drafter(input_ids, inputs, attention_mask)
    drafter.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(drafter) and reloaded.config.feature_layers == drafter.config.feature_layers
    reloaded.attach_target(target)
    assert torch.equal(reloaded(input_ids, inputs, attention_mask), before)
    if kind == "eagle3":
        assert torch.equal(reloaded.d2t, drafter.d2t) and torch.equal(reloaded.t2d, drafter.t2d)


@pytest.mark.parametrize(("kind", "ttt_steps"), [("eagle1", 1), ("eagle3", 3)])
def test_training_loss_is_finite_and_reaches_every_trainable_weight(kind, ttt_steps, target):
    drafter = build(kind, target)
    input_ids, attention_mask, loss_mask = batch_of()
    target_output = target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    weights = FeatureObjective(ttt_steps=ttt_steps, noise=0.1)
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, target_output, weights)
    assert loss.num_tokens.item() == torch.roll(loss_mask, -2, 1)[:, :-2].sum().item()
    assert loss.agree.shape == (ttt_steps,) and (loss.agree <= loss.counted).all()
    assert loss.counted[-1] <= loss.counted[0]  # later steps have fewer positions left
    (loss.loss_sum / loss.num_tokens).backward()
    assert torch.isfinite(loss.loss_sum)
    assert all(p.grad is not None for p in drafter.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_a_bf16_drafter_trains_on_float32_target_features(kind, target):
    """DeepSpeed's bf16 (distributed=zero2/zero3) holds the drafter itself in bf16 with no autocast, while the target's
    features and LM head stay float32: train's DraftTraining autocasts (on an H200 the unfixed run stopped at EAGLE-3's
    fc)."""
    from specdistill.train.train import DraftTraining

    drafter = build(kind, target).to(torch.bfloat16)
    input_ids, attention_mask, loss_mask = batch_of()
    output = target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    assert all(feature.dtype == torch.float32 for feature in output.features.values())
    weights = FeatureObjective(ttt_steps=2, noise=0.1)
    loss = DraftTraining(drafter, weights)({"input_ids": input_ids, "attention_mask": attention_mask,
                                            "loss_mask": loss_mask}, output)
    loss.loss_sum.backward()
    assert torch.isfinite(loss.loss_sum) and loss.num_tokens.item() > 0
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in drafter.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_losses_on_trained_rows_equal_losses_everywhere_then_masked(kind, target):
    """The LM head and losses run on trained rows only; the reference computes every position and masks."""
    from specdistill.distill import objectives
    from specdistill.distill.drafters.feature import sequence_positions, shift_left

    drafter = build(kind, target)
    input_ids, attention_mask, loss_mask = batch_of(seq=16)
    output = target(input_ids, attention_mask, feature_layers=drafter.feature_layers, for_training=True)
    weights = (FeatureObjective(noise=0.0) if kind == "eagle1"
               else FeatureObjective(feature_weight=0.0, token_weight=1.0, ttt_steps=3, noise=0.0))
    loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, weights)
    expected, agree = torch.zeros(()), []
    if kind == "eagle1":
        features = output.features[FINAL_NORMED]
        predicted = drafter(shift_left(input_ids, 1), features, attention_mask)
        logits, target_logits = drafter.target_lm_head(predicted), shift_left(output.logits, 1)
        per_position = objectives.feature_regression(predicted, shift_left(features, 1))
        per_position = per_position + 0.1 * objectives.soft_cross_entropy(logits, target_logits)
        mask = shift_left(loss_mask, 2).float()  # position i is trained when token i + 2 is masked
        expected = (per_position * mask).sum()
        agree.append((objectives.top1_agreement(logits, target_logits) * mask).sum())
    else:
        hidden, caches = drafter.fuse(output.features), [[] for _ in drafter.layers]
        bias, positions = causal_bias(attention_mask, hidden.dtype), sequence_positions(input_ids)
        for step in range(3):
            hidden = drafter.step(shift_left(input_ids, 1 + step), hidden, positions + step, bias, caches)
            logits, target_logits = drafter.logits(hidden), shift_left(output.logits, 1 + step)
            restricted, in_vocab = objectives.restrict_to_draft_vocab(target_logits, drafter.draft_to_target)
            mask = shift_left(loss_mask, 2 + step).float()
            cross_entropy = objectives.soft_cross_entropy(logits, restricted)
            expected = expected + 0.8**step * (cross_entropy * mask * in_vocab).sum()
            drafted = drafter.draft_to_target[logits.argmax(-1)]
            agree.append(((drafted == target_logits.argmax(-1)) * mask).sum())
    torch.testing.assert_close(loss.loss_sum, expected, rtol=1e-5, atol=1e-5)
    assert loss.agree.tolist() == torch.stack(agree).tolist()
    assert loss.num_tokens.item() == shift_left(loss_mask, 2).sum().item()


def test_draft_vocab_is_the_most_frequent_ids_with_vllm_offsets():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    ids = select_draft_vocab(counts, 3, vocab_size=8)
    assert ids.tolist() == [2, 3, 5]
    drafter = Eagle3Drafter(Eagle3Config(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=16, vocab_size=8, draft_vocab_size=3))
    drafter.set_draft_vocab(ids)
    assert (torch.arange(3) + drafter.d2t).tolist() == [2, 3, 5]  # target_id = draft_id + d2t[draft_id]
    assert drafter.t2d.nonzero().flatten().tolist() == [2, 3, 5]


def test_a_drafter_for_another_target_is_refused(target):
    config = draft_config_from_target(Eagle1Config, target.config, [FINAL_NORMED])
    check_drafter_matches_target(config, target, "drafter_path")
    config.target_hidden_size = 4096
    with pytest.raises(UserError, match="drafter_path: the drafter was built for a target with hidden size 4096"):
        check_drafter_matches_target(config, target, "drafter_path")
