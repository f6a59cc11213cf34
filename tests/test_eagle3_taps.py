"""EAGLE-3's tapped layers, an option of the kind (`drafter.feature_layers`), not of the target: the default rule gives
three distinct layers at every depth (the target presets' and the toy targets' taps among them), and a layer tapped
twice (or one the target lacks) is refused when the drafter is built, not only by `export` at the end (issue 18: a
6-layer target got [2, 3, 3])."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdistill.distill.drafters.eagle3 import Eagle3Drafter, Eagle3Options, default_eagle3_layers
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.errors import UserError
from specdistill.distill.target import FrozenTarget
from specdistill.train.config import register_configs
from tests.conftest import TRAIN_FAST, compose, run_cli


def random_target(num_layers: int, vocab_size: int) -> FrozenTarget:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    return FrozenTarget(LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory: pytest.TempPathFactory, toy_tokenizer) -> Path:
    """A user's 6-layer model folder (a small random Llama) with the toy's tokenizer, so toy datasets fit it."""
    folder = tmp_path_factory.mktemp("six_layers")
    random_target(6, len(toy_tokenizer)).model.save_pretrained(folder)
    copy.deepcopy(toy_tokenizer).save_pretrained(folder)
    return folder


def build(target: FrozenTarget, **options) -> Eagle3Drafter:
    return Eagle3Drafter.build(Eagle3Options(draft_vocab_size=64, **options), BuildContext(target))


def test_default_taps_are_three_distinct_layers_at_every_depth():
    for num_layers in range(3, 129):
        taps = default_eagle3_layers(num_layers)
        assert len(set(taps)) == 3 and all(0 <= tap < num_layers for tap in taps), (num_layers, taps)
        assert taps == sorted(taps), (num_layers, taps)  # low, middle, high
    assert default_eagle3_layers(32) == [2, 16, 29]  # the reference rule [2, L/2, L−3] where it gives that
    assert default_eagle3_layers(7) == [2, 3, 4]


@pytest.mark.parametrize(("preset", "taps"), [
    ("toy", [1, 3, 5]), ("toy_tiny", [0, 1, -1]), ("llama3_8b_instruct", [2, 16, 29]),
    ("qwen2_5_7b_instruct", [2, 14, 25]), ("qwen3_8b", [2, 18, 33]), ("vicuna_7b_v1_3", [2, 16, 29]),
])
def test_each_target_preset_gets_the_taps_it_used_to_write_out(preset: str, taps: list[int]):
    """The presets wrote these taps under target.eagle3_layers; the kind's default for their depth is the same."""
    depth = {"toy": 6, "toy_tiny": 2, "llama3_8b_instruct": 32, "qwen2_5_7b_instruct": 28, "qwen3_8b": 36,
             "vicuna_7b_v1_3": 32}[preset]
    assert default_eagle3_layers(depth) == taps
    register_configs()
    train = compose("train", [f"target={preset}", "drafter=eagle3", "data_dir=unused", "out_dir=unused"])
    assert train.drafter.feature_layers is None and "eagle3_layers" not in train.target


def test_a_six_layer_target_gets_an_exportable_drafter(six_layer_model: Path):
    drafter = build(FrozenTarget(LlamaForCausalLM.from_pretrained(six_layer_model)))
    assert len(set(drafter.feature_layers)) == 3
    assert drafter.engine_layout("vllm", gamma=5).config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]


def test_build_refuses_a_layer_tapped_twice():
    with pytest.raises(UserError) as error:
        build(random_target(6, 64), feature_layers=[1, 1, 4])
    message = str(error.value)
    assert "drafter.feature_layers" in message and "taps layer 1 twice" in message and "\n" not in message


def test_build_refuses_a_layer_the_target_lacks():
    with pytest.raises(UserError, match=r"drafter\.feature_layers.*layer id 6 is out of range .* 6 layers"):
        build(random_target(6, 64), feature_layers=[1, 3, 6])


def test_a_two_layer_target_taps_its_final_normed_state_and_a_one_layer_target_needs_its_taps_named():
    assert build(random_target(2, 64)).feature_layers == (0, 1, -1)  # trains; export refuses the −1 tap
    with pytest.raises(UserError, match=r"3 distinct states.*1 layer.*drafter\.feature_layers"):
        build(random_target(1, 64))
    assert build(random_target(1, 64), feature_layers=[0, -1]).feature_layers == (0, -1)  # named: trains


def test_the_old_target_key_is_refused_at_start(tmp_path: Path):
    result = run_cli("train", "target.eagle3_layers=[1,3,5]", "data_dir=unused", f"out_dir={tmp_path}/out",
                     cwd=tmp_path)
    assert result.returncode == 2 and "eagle3_layers" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_train_refuses_a_layer_tapped_twice_before_training(six_layer_model: Path, toy_dataset, tmp_path: Path):
    result = run_cli("train", *TRAIN_FAST, f"target.name_or_path={six_layer_model}", "drafter=eagle3",
                     "drafter.feature_layers=[2,3,3]", f"data_dir={toy_dataset[0]}", f"out_dir={tmp_path}/out",
                     "train.max_steps=2", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "drafter.feature_layers=[2, 3, 3] taps layer 3 twice" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "drafter").exists()
