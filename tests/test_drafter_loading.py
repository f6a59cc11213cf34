"""Loading a drafter folder for decoding: every way a folder can be unusable ends in one message naming the folder or
file and what to do, and a drafter never silently serves a target it was not trained for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM

from specdistill.distill.drafters import drafter_kind, load_drafting
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.errors import UserError
from specdistill.distill.target import FrozenTarget
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def saved_drafter(tiny, tmp_path_factory) -> Path:
    """An (untrained) EAGLE-1 drafter saved as `specdistill train` saves it, recording the tiny target."""
    unit = drafter_kind("eagle1")
    drafter = unit.model_class.build(unit.options(), BuildContext(tiny.target, target_name_or_path="toy_tiny"))
    path = tmp_path_factory.mktemp("drafter") / "drafter"
    drafter.save_pretrained(path, safe_serialization=True)
    return path


def damaged_copy(source: Path, tmp_path: Path, damage) -> Path:
    path = tmp_path / "drafter"
    shutil.copytree(source, path)
    damage(path)
    return path


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])


DAMAGES = {
    "invalid config.json": (lambda path: (path / "config.json").write_text("{not json"), r"config.json is not valid JSON"),
    "no model_type": (lambda path: (path / "config.json").write_text(json.dumps({"hidden_size": 64})),
                      r"config.json has no model_type"),
    "missing weights": (lambda path: (path / "model.safetensors").unlink(), r"has no model.safetensors"),
    "truncated weights": (lambda path: truncate(path / "model.safetensors"), r"cannot load the weights in .*truncated"),
    "no config.json": (lambda path: (path / "config.json").unlink(), r"has no config.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_drafter_folder_is_refused_with_one_clear_message(tiny, saved_drafter, tmp_path, damage):
    change, message = DAMAGES[damage]
    path = damaged_copy(saved_drafter, tmp_path, change)
    with pytest.raises(UserError, match=rf"drafter_path: .*{message}"):
        load_drafting(str(path), tiny.target, "cpu")


def test_the_intact_folder_loads(tiny, saved_drafter):
    drafting = load_drafting(str(saved_drafter), tiny.target, "cpu")
    assert drafting.feature_layers == (-1,)


def test_a_truncated_drafter_ends_in_one_line_at_the_cli(saved_drafter, tmp_path):
    path = damaged_copy(saved_drafter, tmp_path, lambda path: truncate(path / "model.safetensors"))
    result = run_cli("eval", "target=toy_tiny", "eval.num_prompts=2", f"drafter_path={path}",
                     f"out_dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: drafter_path: cannot load the weights in {path}")


def test_a_bert_folder_is_not_a_token_level_drafter(tiny, tmp_path):
    bert = BertModel(BertConfig(vocab_size=tiny.target.config.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match=r"holds a 'bert' model, which is not a causal language model"):
        load_drafting(str(tmp_path / "bert"), tiny.target, "cpu")


def test_a_drafter_for_a_same_shaped_but_different_target_is_refused(tiny, saved_drafter):
    torch.manual_seed(5)
    other = FrozenTarget(LlamaForCausalLM(tiny.model.config))  # same shapes, other weights
    with pytest.raises(UserError, match=r"trained on another target of the same shape \(toy_tiny"):
        load_drafting(str(saved_drafter), other, "cpu")


def test_a_folder_no_kind_saved_and_transformers_does_not_know_is_refused(tiny, saved_drafter, tmp_path):
    """The token-level kind recognises every folder no other kind saved, and says why this one cannot draft."""
    path = damaged_copy(saved_drafter, tmp_path, lambda path: (path / "config.json").write_text(
        json.dumps({**json.loads((path / "config.json").read_text()), "model_type": "specdistill_eagle9"})))
    with pytest.raises(UserError, match=r"model_type 'specdistill_eagle9' is neither a specdistill drafter nor a"):
        load_drafting(str(path), tiny.target, "cpu")
