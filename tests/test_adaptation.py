"""Online drafter adaptation (eval.adaptation=online, distill/adaptation.py): the target's features and logits the
decoder records equal a fresh forward over the decoded sequence, the adapting drafter learns (τ rises on the stream)
while greedy output stays plain decoding's and sampled output keeps the target's distribution, and eval reports it and
saves the adapted drafter with where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdistill.distill.adaptation import OnlineAdapter
from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters import load_drafting
from specdistill.distill.errors import UserError
from specdistill.distill.target import FrozenTarget
from specdistill.eval.eval import ADAPTED_DRAFTER, evaluate
from tests.conftest import compose, random_drafter
from tests.test_decoding import chi_square_test, exact_joint, plain_outputs, random_lm, sampled_joint_counts


@pytest.fixture
def eagle3_folder(tmp_path: Path, target) -> Path:
    folder = tmp_path / "eagle3"
    random_drafter("eagle3", target, target_name_or_path="toy_tiny", draft_vocab_size=512).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("config", [
    DecodingConfig(method="chain", gamma=4, max_new_tokens=30),
    DecodingConfig(method="tree", tree_depth=3, tree_top_k=3, tree_total_tokens=10, max_new_tokens=30,
                   temperature=1.0),
], ids=["chain-greedy", "tree-T1"])
def test_the_recorded_target_output_equals_a_fresh_forward(target, eagle3_folder, tiny, config):
    adapter = OnlineAdapter(str(eagle3_folder), target, torch.device("cpu"), lr=1e-3)
    decoder = Decoder(target, adapter.drafting(), config, record_target=True)
    prompt = tiny.prompts[0]
    generation = decoder.generate(prompt, torch.Generator().manual_seed(0))
    sequence = torch.tensor([prompt + generation.output_ids])
    with torch.no_grad():
        fresh = target(sequence, torch.ones_like(sequence), feature_layers=decoder.feature_layers)
    recorded, length, start = generation.target_output, sequence.shape[1], len(prompt) - 1
    assert recorded.logits.shape[:2] == (1, length)
    # every position the drafter reads (all but the last) and the logits that label the output's tokens
    torch.testing.assert_close(recorded.logits[:, start:length - 1], fresh.logits[:, start:length - 1],
                               atol=2e-4, rtol=1e-4)
    for layer_id, feature in recorded.features.items():
        torch.testing.assert_close(feature[:, :length - 1], fresh.features[layer_id][:, :length - 1],
                                   atol=2e-4, rtol=1e-4)


def test_an_adapting_drafter_learns_the_stream_and_greedy_output_stays_plain(target, eagle3_folder, tiny):
    """An untrained drafter adapting on the same three prompts, round after round: its τ rises well above the frozen
    drafter's, and every output, before and after each update, is plain greedy decoding's."""
    config = DecodingConfig(method="chain", gamma=4, max_new_tokens=24)
    prompts = tiny.prompts[:3]
    expected = plain_outputs(target, prompts, config)
    adapter = OnlineAdapter(str(eagle3_folder), target, torch.device("cpu"), lr=3e-3, steps=2)
    decoder = Decoder(target, adapter.drafting(), config, record_target=True)
    taus = []
    for _ in range(5):
        accept_lengths = []
        for prompt, plain in zip(prompts, expected):
            generation = decoder.generate(prompt)
            assert generation.output_ids == plain
            accept_lengths += generation.accept_lengths
            adapter.update(prompt, generation)
            decoder.use_proposer(adapter.drafting())
        taus.append(sum(accept_lengths) / len(accept_lengths))
    assert adapter.updates == 15 and adapter.losses[-1] < adapter.losses[0]
    print("tau per round", taus)
    assert taus[-1] > taus[0] + 0.5, taus


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_sampled_output_keeps_the_target_distribution_while_the_drafter_adapts(tmp_path: Path):
    """test_decoding's G-test (3 sampled tokens, 5-token vocabulary, T = 0.7, top-p 0.8) with an EAGLE-1 drafter that
    takes an AdamW step after every generation."""
    target_model = random_lm(scale=60.0)
    target = FrozenTarget(target_model)
    folder = tmp_path / "eagle1"
    random_drafter("eagle1", target, perturb=0.5).save_pretrained(folder, safe_serialization=True)
    config = DecodingConfig(method="chain", gamma=2, temperature=0.7, top_p=0.8, max_new_tokens=3)
    adapter = OnlineAdapter(str(folder), target, torch.device("cpu"), lr=1e-2)
    decoder = Decoder(target, adapter.drafting(), config, record_target=True)
    generate = decoder.generate

    def generate_then_adapt(prompt, generator):
        generation = generate(prompt, generator)
        adapter.update(prompt, generation)
        decoder.use_proposer(adapter.drafting())
        return generation

    decoder.generate = generate_then_adapt
    prompt = [1, 2, 3]
    counts, acceptance = sampled_joint_counts(decoder, prompt, 4000)
    assert adapter.updates == 4000
    assert 0.2 < acceptance < 0.95, "drafts must be accepted and rejected often, or the test proves little"
    statistic, critical = chi_square_test(counts, exact_joint(target_model, prompt, 3, 0.7, 0.8).flatten())
    assert statistic < critical, (statistic, critical)


def test_eval_adds_an_online_row_and_saves_the_adapted_drafter(tmp_path: Path, target, eagle3_folder):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": name, "category": "code", "prompt": text}) + "\n" for name, text in [
        ("a", "def add(a, b):"), ("b", "class Stack:"), ("c", "def add(a, b):"), ("d", "class Queue:")]))
    out_dir = tmp_path / "out"
    overrides = ["target=toy_tiny", "bench=local", f"bench.path={bench}", "eval.max_new_tokens=24",
                 "eval.warmup_prompts=0", "eval.verify_lossless=true", "eval.hf_baselines=false",
                 f"out_dir={out_dir}", f"drafter_path={eagle3_folder}"]
    report = evaluate(compose("eval", [*overrides, "eval.adaptation=online", "eval.adaptation_lr=3e-3"]))
    frozen, online = report["rows"]
    assert online["drafter"] == f"online adaptation: {eagle3_folder}"
    assert frozen["lossless_check"] == online["lossless_check"] == "passed"
    adaptation = online["adaptation"]
    assert (adaptation["updates"], adaptation["stream_prompts"], adaptation["held_out_prompts"]) == (3, 3, 1)
    # the frozen row is the drafter as loaded: its τ on the stream is its row's τ over those prompts
    assert adaptation["frozen_tau_stream"] is not None and adaptation["tau_held_out"] is not None
    assert "## Online drafter adaptation" in (out_dir / "report.md").read_text()
    saved = out_dir / ADAPTED_DRAFTER
    provenance = json.loads((saved / "adaptation.json").read_text())
    assert provenance["adapted_from"] == str(eagle3_folder) and provenance["prompts"] == ["a", "b", "c"]
    load_drafting(str(saved), target, "cpu")  # a drafter folder like any other, with changed weights
    adapted, original = load_file(saved / "model.safetensors"), load_file(eagle3_folder / "model.safetensors")
    assert adapted.keys() == original.keys() and not torch.equal(adapted["fc.weight"], original["fc.weight"])
    with pytest.raises(UserError, match=r"eval.adaptation=online adapts one drafter, but drafter_path names 2"):
        evaluate(compose("eval", [*overrides[:-1], f"drafter_path=[{eagle3_folder},{eagle3_folder}x]",
                                  "eval.adaptation=online", "overwrite=true"]))
