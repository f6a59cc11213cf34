"""drafter=token_lm (DistillSpec / GKD): the token-level divergences, the three ways to start the drafter, gradients
that reach the drafter only, on-policy batches, and `specdistill train` → eval → transformers' assisted generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GenerationConfig, LlamaConfig, LlamaForCausalLM

from specdistill.distill import objectives
from specdistill.distill.drafters import drafter_kind, resolve_objective
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.drafters.token_lm import Init, TokenLMDrafter
from specdistill.distill.errors import UserError
from specdistill.distill.objectives import DataSource, Divergence, TokenObjective
from specdistill.distill.target import FrozenTarget
from tests.conftest import TRAIN_FAST, run_cli

KIND = drafter_kind("token_lm")


def build(target: FrozenTarget, **options) -> TokenLMDrafter:
    torch.manual_seed(0)
    return KIND.model_class.build(KIND.options(**options), BuildContext(target))


def random_logits(*shape: int, seed: int) -> torch.Tensor:
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# The divergences (p: the target's distribution, q: the drafter's)


def test_forward_kl_is_zero_exactly_when_the_distributions_match():
    draft, target = random_logits(4, 6, 50, seed=0), random_logits(4, 6, 50, seed=1)
    assert torch.allclose(objectives.forward_kl(target, target), torch.zeros(4, 6), atol=1e-6)
    assert torch.allclose(objectives.forward_kl(target + 7.0, target), torch.zeros(4, 6), atol=1e-5)  # same softmax
    assert (objectives.forward_kl(draft, target) > 1e-3).all()
    p, q = target.softmax(-1), draft.softmax(-1)
    assert torch.allclose(objectives.forward_kl(draft, target), (p * (p.log() - q.log())).sum(-1), atol=1e-5)
    assert torch.allclose(objectives.reverse_kl(draft, target), (q * (q.log() - p.log())).sum(-1), atol=1e-5)


def test_jsd_is_symmetric_at_one_half_and_at_most_log_2():
    a, b = random_logits(8, 30, seed=2), random_logits(8, 30, seed=3)
    jsd = objectives.generalized_jsd(a, b, beta=0.5)
    assert torch.allclose(jsd, objectives.generalized_jsd(b, a, beta=0.5), atol=1e-6)
    assert (jsd > 0).all() and (jsd <= math.log(2)).all()
    assert not torch.allclose(objectives.generalized_jsd(a, b, beta=0.2), objectives.generalized_jsd(b, a, beta=0.2))
    disjoint_p, disjoint_q = torch.tensor([[60.0, -60.0, -60.0]]), torch.tensor([[-60.0, 60.0, -60.0]])
    assert torch.allclose(objectives.generalized_jsd(disjoint_q, disjoint_p, beta=0.5), torch.tensor([math.log(2)]))


def test_tvd_is_one_minus_the_overlap_that_speculative_sampling_accepts():
    draft, target = random_logits(5, 7, 40, seed=4), random_logits(5, 7, 40, seed=5)
    overlap = torch.minimum(draft.softmax(-1), target.softmax(-1)).sum(-1)
    assert torch.allclose(objectives.total_variation(draft, target), 1 - overlap, atol=1e-6)
    assert torch.allclose(objectives.total_variation(target, target), torch.zeros(5, 7), atol=1e-6)


@pytest.mark.parametrize("divergence", [Divergence.fkl, Divergence.rkl, Divergence.jsd, Divergence.tvd])
def test_the_temperature_softens_both_distributions(divergence):
    draft, target, labels = random_logits(3, 20, seed=6), random_logits(3, 20, seed=7), torch.zeros(3, dtype=torch.long)
    warm = TokenObjective(divergence=divergence, temperature=2.0).per_position(draft, target, labels)
    cold = TokenObjective(divergence=divergence).per_position(draft / 2.0, target / 2.0, labels)
    one_side = TokenObjective(divergence=divergence).per_position(draft / 2.0, target, labels)
    assert torch.allclose(warm, cold, atol=1e-6) and not torch.allclose(warm, one_side, atol=1e-3)


def test_ce_is_minus_log_q_of_the_data_token():
    draft, labels = random_logits(2, 5, 11, seed=8), torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(9))
    expected = -draft.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    ce = TokenObjective(divergence=Divergence.ce).per_position(draft, random_logits(2, 5, 11, seed=10), labels)
    assert torch.allclose(ce, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Building: init=config | target_prefix | pretrained


def test_init_config_is_a_fresh_lm_of_the_targets_architecture_with_the_shape_overrides(tiny):
    drafter = build(tiny.target, num_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                    num_key_value_heads=1)
    config = drafter.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == ("llama", 1, 32, 48)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.vocab_size == tiny.target.config.vocab_size and not hasattr(TokenLMDrafter, "config_class")
    logits = drafter.model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, tiny.target.config.vocab_size)
    default = build(tiny.target).model.config
    assert (default.num_hidden_layers, default.hidden_size, default.head_dim) == (2, 64, 16)
    # no sampling defaults in its generation config (assisted generation and on-policy sampling read it)
    assert drafter.model.generation_config.to_diff_dict().keys() <= {"eos_token_id", "pad_token_id", "bos_token_id",
                                                                     "transformers_version"}


def test_init_target_prefix_copies_the_targets_first_layers_and_shares_nothing(tiny):
    drafter = build(tiny.target, init=Init.target_prefix, num_layers=1)
    mine, theirs = drafter.model.state_dict(), tiny.model.state_dict()
    assert set(mine) == {name for name in theirs if ".layers.1." not in name}
    for name, weight in mine.items():
        assert torch.equal(weight, theirs[name]) and weight.data_ptr() != theirs[name].data_ptr(), name
    before = tiny.model.lm_head.weight.clone()
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(1.0)
    assert torch.equal(tiny.model.lm_head.weight, before)
    whole = build(tiny.target, init=Init.target_prefix, num_layers=2)  # every layer: the target itself, copied
    tokens = torch.tensor([tiny.prompts[0]])
    torch.testing.assert_close(whole.model(tokens).logits, tiny.target(tokens).logits)


def save_lm(path: Path, vocab_size: int, **generation: object) -> LlamaForCausalLM:
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.generation_config = GenerationConfig(eos_token_id=4, **generation)
    model.save_pretrained(path)
    return model


def test_init_pretrained_loads_a_local_causal_lm_without_its_sampling_defaults(tiny, tmp_path):
    saved = save_lm(tmp_path / "small", tiny.target.config.vocab_size, do_sample=True, temperature=0.6, top_p=0.9)
    drafter = build(tiny.target, init=Init.pretrained, name_or_path=str(tmp_path / "small"))
    for name, weight in saved.state_dict().items():
        assert torch.equal(drafter.model.state_dict()[name], weight), name
    generation = drafter.model.generation_config
    assert not generation.do_sample and generation.top_p in (None, 1.0) and generation.eos_token_id == [4, 0]


def test_a_drafter_on_another_vocabulary_or_not_a_causal_lm_is_refused_in_one_line(tiny, tmp_path):
    save_lm(tmp_path / "other_vocab", 512)
    with pytest.raises(UserError) as error:
        build(tiny.target, init=Init.pretrained, name_or_path=str(tmp_path / "other_vocab"))
    assert one_line_error(error).startswith(f"drafter.name_or_path: {tmp_path / 'other_vocab'} has vocabulary size 512, "
                                            "the target 1024")
    BertModel(BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError) as error:
        build(tiny.target, init=Init.pretrained, name_or_path=str(tmp_path / "bert"))
    assert "holds a 'bert' model, which is not a causal language model" in one_line_error(error)
    with pytest.raises(UserError) as error:
        build(tiny.target, init=Init.pretrained, name_or_path=str(tmp_path / "missing"))
    assert one_line_error(error).startswith("drafter.name_or_path: cannot read")
    small_vocab_target = FrozenTarget(LlamaForCausalLM.from_pretrained(tmp_path / "other_vocab"))
    with pytest.raises(UserError) as error:
        build(tiny.target).check_target(small_vocab_target, "drafter_path")
    assert one_line_error(error).startswith("drafter_path: the token-level drafter has vocabulary size 1024, the target 512")


@pytest.mark.parametrize(("options", "key"), [
    ({"init": Init.pretrained}, "drafter.name_or_path"),
    ({"name_or_path": "some/model"}, "drafter.name_or_path"),
    ({"init": Init.target_prefix, "num_layers": 3}, "drafter.num_layers"),
    ({"init": Init.target_prefix, "hidden_size": 32}, "drafter.hidden_size"),
    ({"hidden_size": 30}, "drafter.hidden_size"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "drafter.num_key_value_heads"),
    ({"num_layers": 0}, "drafter.num_layers"),
], ids=str)
def test_a_misconfigured_drafter_is_one_error_naming_the_key(tiny, options, key):
    with pytest.raises(UserError) as error:
        build(tiny.target, **options)
    assert one_line_error(error).startswith(f"{key}: ")


def test_objective_values_training_could_not_use_are_refused_at_start():
    with pytest.raises(UserError, match=r"^objective.beta: 1.0; JSD\(β\) needs 0 < β < 1"):
        resolve_objective(KIND, TokenObjective(divergence=Divergence.jsd, beta=1.0))
    with pytest.raises(UserError, match=r"^objective.on_policy_tokens: 0"):
        resolve_objective(KIND, TokenObjective(on_policy_tokens=0))
    assert resolve_objective(KIND, None) == TokenObjective()  # the default: forward KL on the prepared data


def test_init_from_loads_a_saved_drafter_of_the_same_shape_only(tiny, tmp_path):
    trained = build(tiny.target, num_layers=1)
    trained.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    fresh = build(tiny.target, num_layers=1)
    with torch.no_grad():
        fresh.model.lm_head.weight.zero_()
    fresh.load_initial_weights(tmp_path / "drafter")
    assert torch.equal(fresh.model.lm_head.weight, trained.model.lm_head.weight)
    with pytest.raises(UserError) as error:
        build(tiny.target, num_layers=2).load_initial_weights(tmp_path / "drafter")
    assert one_line_error(error).startswith(f"init_from: {tmp_path / 'drafter'} has other weights than this run's")


# ---------------------------------------------------------------------------------------------------------------
# Training: the loss and the on-policy batches


def toy_batch(tiny) -> dict[str, torch.Tensor]:
    """Three right-padded rows: a prompt then a response (loss-masked), a shorter one, and one with no masked token."""
    rows = [(tiny.prompts[0], 12), (tiny.prompts[1][:9], 5), (tiny.prompts[2][:14], 0)]
    length = max(len(prompt) + response for prompt, response in rows)
    batch = {key: torch.zeros(3, length, dtype=torch.long) for key in ("input_ids", "attention_mask", "loss_mask")}
    for row, (prompt, response) in enumerate(rows):
        ids = prompt + [(7 * step + row) % 900 + 20 for step in range(response)]
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["loss_mask"][row, len(prompt) : len(ids)] = 1
    return batch


@pytest.mark.parametrize("divergence", list(Divergence))
def test_gradients_reach_the_drafter_only(tiny, divergence):
    drafter, batch = build(tiny.target, num_layers=1), toy_batch(tiny)
    target_output = tiny.target(batch["input_ids"], batch["attention_mask"], for_training=True)
    loss = drafter.training_loss(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], target_output,
                                 TokenObjective(divergence=divergence))
    loss.loss_sum.backward()
    assert loss.num_tokens.item() == drafter.trained_rows(batch["loss_mask"]).sum().item() == 12 + 5
    assert loss.agree.shape == loss.counted.shape == (1,) and 0 <= loss.agree.item() <= loss.counted.item()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in drafter.parameters()), "a drafter weight got no gradient"
    assert all(parameter.grad is None for parameter in tiny.model.parameters())


ON_POLICY = TokenObjective(data_source=DataSource.on_policy, on_policy_fraction=1.0, on_policy_tokens=8)


def test_on_policy_batches_keep_the_prompts_and_train_on_the_drafters_samples(tiny):
    drafter, batch = build(tiny.target, num_layers=1), toy_batch(tiny)
    drafter.model.train()
    new = drafter.prepare_batch(batch, ON_POLICY, torch.Generator().manual_seed(0))
    assert drafter.model.training  # sampling ran in eval mode and put the mode back
    assert new.keys() == batch.keys() and all(new[key].dtype == batch[key].dtype for key in batch)
    eos = set(drafter.model.generation_config.eos_token_id)
    lengths = new["attention_mask"].sum(1)
    for row, prompt_length in enumerate([len(tiny.prompts[0]), 9]):
        mask, ids = new["attention_mask"][row], new["input_ids"][row]
        assert mask[: lengths[row]].all() and not mask[lengths[row] :].any()  # right padding
        assert torch.equal(ids[:prompt_length], batch["input_ids"][row, :prompt_length])  # the prompt, token for token
        sampled = ids[prompt_length : lengths[row]].tolist()
        assert 1 <= len(sampled) <= 8 and not eos & set(sampled[:-1])  # stops at the first EOS, keeping it
        assert len(sampled) == 8 or sampled[-1] in eos
        expected_mask = torch.zeros_like(mask)
        expected_mask[prompt_length : lengths[row]] = 1
        assert torch.equal(new["loss_mask"][row], expected_mask)
    kept = int(batch["attention_mask"][2].sum())  # no masked token: the row as it was
    assert torch.equal(new["input_ids"][2, :kept], batch["input_ids"][2, :kept]) and not new["loss_mask"][2].any()
    again = drafter.prepare_batch(batch, ON_POLICY, torch.Generator().manual_seed(0))
    assert all(torch.equal(new[key], again[key]) for key in batch)
    other = drafter.prepare_batch(batch, ON_POLICY, torch.Generator().manual_seed(1))
    assert not all(torch.equal(new[key], other[key]) for key in batch)


def test_fixed_data_and_a_zero_on_policy_share_leave_the_batch_alone(tiny):
    drafter, batch = build(tiny.target, num_layers=1), toy_batch(tiny)
    generator = torch.Generator().manual_seed(0)
    assert drafter.prepare_batch(batch, TokenObjective(), generator) is batch
    never = TokenObjective(data_source=DataSource.on_policy, on_policy_fraction=0.0)
    assert drafter.prepare_batch(batch, never, generator) is batch


# ---------------------------------------------------------------------------------------------------------------
# End to end: specdistill train drafter=token_lm → a plain causal LM folder → eval and assisted generation


RUNS = {
    "tvd_on_policy": ["objective=tvd", "objective.data_source=on_policy", "objective.on_policy_fraction=1.0",
                      "objective.on_policy_tokens=8"],
    "jsd_target_prefix": ["objective=jsd", "drafter.init=target_prefix", "drafter.num_layers=1"],
}


@pytest.fixture(scope="module")
def token_lm_runs(toy_dataset, tmp_path_factory) -> dict[str, Path]:
    """Each RUNS entry trained for 20 steps on the tiny toy target → its out_dir."""
    runs = {}
    for name, options in RUNS.items():
        out_dir = tmp_path_factory.mktemp(name)
        result = run_cli("train", "drafter=token_lm", f"data_dir={toy_dataset[0]}", f"out_dir={out_dir}",
                         "train.max_steps=20", "train.eval_every=20", "train.eval_batches=2", *TRAIN_FAST, *options,
                         cwd=out_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out_dir
    return runs


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "drafter" / "summary.json").read_text())["history"]


def test_trained_token_lms_are_plain_causal_lms_that_eval_decodes_losslessly(token_lm_runs, tmp_path):
    for out_dir in token_lm_runs.values():
        model = AutoModelForCausalLM.from_pretrained(out_dir / "drafter")
        assert type(model).__name__ == "LlamaForCausalLM" and not model.generation_config.do_sample
        assert history(out_dir)[-1]["step"] == 20 and "val_top1" in history(out_dir)[-1]
    # on-policy responses are the prompt plus ≤ 8 sampled tokens, the same records (same seed) read with their
    # prepared responses are whole conversations; a toy prompt is about half of its conversation (measured: 0.51)
    assert history(token_lm_runs["tvd_on_policy"])[-1]["tokens_trained"] < \
        0.75 * history(token_lm_runs["jsd_target_prefix"])[-1]["tokens_trained"]
    paths = [str(out_dir / "drafter") for out_dir in token_lm_runs.values()]
    result = run_cli("eval", f"drafter_path=[{','.join(paths)}]", "target=toy_tiny", "bench=toy", "eval.num_prompts=2",
                     "eval.max_new_tokens=16", "eval.warmup_prompts=0", "eval.hf_baselines=false",
                     f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [report["drafter"] for report in reports] == paths
    assert all(report["lossless_check"] == "passed" for report in reports)
    assert all(report["lossless_check_method"] == "greedy output equals plain decoding" for report in reports)


def test_transformers_assisted_generation_with_a_trained_token_lm_equals_greedy_decoding(tiny, token_lm_runs):
    for out_dir in token_lm_runs.values():
        assistant = AutoModelForCausalLM.from_pretrained(out_dir / "drafter").eval()
        for prompt in tiny.prompts[:2]:
            input_ids = torch.tensor([prompt])
            options = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=16)
            plain = tiny.model.generate(input_ids, **options)
            assisted = tiny.model.generate(input_ids, assistant_model=assistant, **options)
            assert torch.equal(assisted, plain)


def test_a_token_level_objective_for_a_feature_drafter_fails_at_start(toy_dataset, tmp_path):
    result = run_cli("train", "drafter=eagle1", "objective=fkl", f"data_dir={toy_dataset[0]}", f"out_dir={tmp_path}",
                     *TRAIN_FAST, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: objective: drafter=eagle1 trains with") and "not TokenObjective" in last
