"""What only a CUDA GPU shows (`python -m pytest -m gpu`; skipped without one; benchmarks/gpu_check.sh runs these and
the 8B-shape benchmarks in under 8 minutes on one H200):

  * bf16 training under distributed=zero2 (DeepSpeed) and distributed=fsdp (FSDP2) on 1 process, NCCL, launched with
    torchrun as tests/test_distributed.py launches its CPU (gloo) runs: finite losses, the sharded checkpoint layout,
    the drafter saved and reloadable;
  * greedy speculative decoding of the toy target in bf16 on the GPU equals plain greedy decoding token for token
    (chain and tree; an untrained EAGLE-3 drafter, rejected almost always, and an always-right one), except where the
    two part at a near-tie of the target that bf16 cannot resolve: a batched verify and a one-token step round
    differently, and CPU float32 (tests/test_decoding.py) has no such ties. Each such parting is checked to be one:
    both tokens within NEAR_TIE of each other in the float32 logits of the same (bf16-rounded) weights;
  * a Llama-3-8B-shaped random bf16 target (benchmarks/eval_speed.py's `llama8b_models`): benchmarks/eval_speed.py
    runs and reports tokens/s, τ, α and c for every method; and with an always-right drafter (the target drafting
    for itself) the target's own time per committed token falls to well under plain decoding's, the premise of
    speculative decoding (one verify forward of γ + 1 tokens costs about one of 1 token on a GPU).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, random_drafter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

# two tokens whose float32 logits differ by at most this are a tie bf16 cannot order (its spacing is 1/16 at 8..16)
NEAR_TIE = 0.125
CHAIN = dict(method="chain", gamma=4, max_new_tokens=40)
TREE = dict(method="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=12, max_new_tokens=40)
# files the one process writes into a checkpoint in each mode (tests/test_distributed.py's PER_PROCESS_FILES, rank 0;
# DeepSpeed's bf16 optimizer prefixes its states with bf16_)
CHECKPOINT_FILES = {"zero2": ["pytorch_model/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "pytorch_model/mp_rank_00_model_states.pt"],
                    "fsdp": ["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp"]}


# --- bf16 training under ZeRO-2 and FSDP, NCCL ----------------------------------------------------------------


def torchrun_one(*args: str) -> list[str]:
    """`torchrun --nproc_per_node 1 -m specdistill.train <args>` on a free rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", f"--master_port={port}",
            "-m", "specdistill.train", *args]


@pytest.mark.parametrize("mode", ["zero2", "fsdp"])
def test_bf16_training_steps_under_a_sharded_mode_on_one_gpu_with_nccl(mode, toy_dataset, tiny, tmp_path: Path):
    if mode == "zero2":
        pytest.importorskip("deepspeed", reason="distributed=zero2 needs DeepSpeed: pip install 'specdistill[deepspeed]'")
    out_dir = tmp_path / mode
    steps = 4
    args = ["target=toy_tiny", "drafter=eagle3", f"data_dir={toy_dataset[0]}", f"distributed={mode}",
            "train.mixed_precision=bf16", f"train.max_steps={steps}", "train.eval_every=2", "train.checkpoint_every=2",
            "train.batch_size=4", "train.tau_prompts=2", "train.eval_batches=2", "drafter.draft_vocab_size=512",
            "objective.ttt_steps=2", "optim.lr=2e-3", "optim.warmup_steps=2", f"out_dir={out_dir}"]
    # NCCL_DEBUG=INFO: NCCL announces itself when the process group's first communicator starts (gloo prints nothing)
    result = subprocess.run(torchrun_one(*args), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "NCCL INFO" in result.stdout + result.stderr, "no NCCL communicator started: the process group is not NCCL"

    summary = json.loads((out_dir / "drafter" / "summary.json").read_text())
    trained = [record for record in summary["history"] if "loss" in record]
    assert [record["step"] for record in trained] == list(range(1, steps + 1))
    for record in trained:
        assert math.isfinite(record["loss"]) and record["loss"] > 0, record
        assert math.isfinite(record["grad_norm"]), record
    assert math.isfinite(summary["final"]["val_top1"]) and summary["final"]["val_tau"] >= 1
    assert (out_dir / "drafter" / "model.safetensors").is_file() and (out_dir / "drafter" / "config.json").is_file()

    checkpoint = out_dir / "checkpoints" / f"step_{steps}"
    for name in CHECKPOINT_FILES[mode]:
        assert (checkpoint / name).is_file(), name  # the mode's own (sharded) checkpoint layout: it ran as asked
    if mode == "zero2":  # DeepSpeed with bf16 enabled holds (and saves) the drafter's parameters in bfloat16
        model_states = checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt"
        states = torch.load(model_states, map_location="cpu", weights_only=True)
        buffers = set(states.get("buffer_names") or ())  # DeepSpeed keeps float32 buffers (rotary tables) as they are
        dtypes = {tensor.dtype for name, tensor in states["module"].items()
                  if name not in buffers and tensor.is_floating_point()}
        assert dtypes == {torch.bfloat16}, dtypes

    from specdistill.distill.drafters import load_drafting

    assert load_drafting(str(out_dir / "drafter"), tiny.target, "cpu") is not None  # as `specdistill eval` loads it


# --- greedy speculative decoding in bf16 equals plain decoding -----------------------------------------------


@pytest.fixture(scope="module")
def cuda_toy(toy_tiny_path: Path):
    """The tiny toy target on the GPU in bf16, and a float32 copy of the same bf16-rounded weights (the tie judge)."""
    from transformers import LlamaForCausalLM

    from specdistill.distill.target import FrozenTarget

    model = LlamaForCausalLM.from_pretrained(toy_tiny_path, dtype=torch.bfloat16).to("cuda").eval()
    judge = copy.deepcopy(model).float().eval()
    return FrozenTarget(model), judge


def parting(judge, prompt: list[int], plain: list[int], speculative: list[int]) -> tuple[int, float] | None:
    """None when the outputs are equal; else (first differing position, |logit difference| there in float32)."""
    if speculative == plain:
        return None
    at = next((i for i, (a, b) in enumerate(zip(plain, speculative)) if a != b), None)
    assert at is not None, f"one output is a prefix of the other: lengths {len(plain)} and {len(speculative)}"
    with torch.no_grad():
        logits = judge(torch.tensor([prompt + plain[:at]], device="cuda")).logits[0, -1].float()
    return at, abs(logits[plain[at]] - logits[speculative[at]]).item()


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("drafter", ["untrained_eagle3", "always_right"])
def test_greedy_speculative_decoding_in_bf16_equals_plain_decoding(drafter, config, cuda_toy, tiny, tmp_path):
    from specdistill.distill.decoding import Decoder, DecodingConfig
    from specdistill.distill.drafters import load_drafting
    from specdistill.distill.drafters.token_lm import LMDrafting

    target, judge = cuda_toy
    if drafter == "always_right":
        proposer = LMDrafting(target.model, "cuda")
    else:  # saved from the CPU float32 target and loaded onto the GPU one, as `specdistill eval` does
        random_drafter("eagle3", tiny.target, target_name_or_path="toy_tiny", draft_vocab_size=512).save_pretrained(
            tmp_path / "drafter", safe_serialization=True)
        proposer = load_drafting(str(tmp_path / "drafter"), target, "cuda")
    decoding = DecodingConfig(**config)
    plain_decoder, decoder = Decoder(target, None, decoding), Decoder(target, proposer, decoding)
    partings, accept_lengths = [], []
    for prompt in tiny.prompts:
        plain = plain_decoder.generate(prompt).output_ids
        generation = decoder.generate(prompt)
        accept_lengths += generation.accept_lengths
        found = parting(judge, prompt, plain, generation.output_ids)
        if found is None:
            assert sum(generation.accept_lengths) + 1 == len(plain)  # the prefill makes the first token
        else:
            at, gap = found
            assert gap <= NEAR_TIE, (f"speculative decoding parts from plain decoding at token {at} where the target "
                                     f"is no near-tie (float32 logits {gap:.3f} apart)")
            partings.append(found)
    print(drafter, config["method"], "τ", round(sum(accept_lengths) / len(accept_lengths), 2), "near-tie partings",
          partings)
    assert len(partings) <= len(tiny.prompts) // 3, f"too many near-tie partings to be ties: {partings}"
    if drafter == "always_right":  # its drafts are accepted (bar a near-tie): most steps commit several tokens
        assert sum(accept_lengths) / len(accept_lengths) > 3


# --- a Llama-3-8B-shaped target -------------------------------------------------------------------------------


def eval_speed_module():
    """benchmarks/eval_speed.py as a module (registered first: its dataclasses look their module up)."""
    name = "specdistill_benchmarks_eval_speed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / "eval_speed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_speed_benchmark_measures_every_method_on_a_llama8b_shaped_target(toy_tiny_path, tmp_path: Path):
    """benchmarks/eval_speed.py --shape llama8b, briefly: random weights (its drafter, the target's first 2 layers,
    is accepted as chance has it), so only that every method ran and was measured is asserted."""
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "eval_speed.py"), "--shape", "llama8b",
                             "--tokenizer", str(toy_tiny_path), "--num-prompts", "2", "--max-new-tokens", "24",
                             "--gamma", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-2500:])
    report = json.loads(out.read_text())
    assert report["shape"] == "llama8b" and report["device"].startswith("cuda")
    methods = report["methods"]
    assert set(methods) == {"ours plain", "ours LM γ=4", "HF plain", "HF assisted γ=4", "HF prompt lookup γ=4"}
    for name, row in methods.items():
        assert row["tokens"] > 0 and row["seconds"] > 0 and math.isfinite(row["tokens_per_s"]), (name, row)
    # 8B in bf16 on a GPU decodes tens of tokens a second; a run that fell back to the CPU would make < 1
    assert methods["ours plain"]["tokens_per_s"] > 5, methods["ours plain"]
    ours = methods["ours LM γ=4"]
    assert 1 <= ours["tau"] <= 5 and 0 <= ours["alpha"] <= 1 and ours["c"] > 0, ours


def test_an_always_right_drafter_cuts_the_llama8b_targets_time_per_token(tiny):
    """The 8B-shaped random target drafting for itself (so its drafts are right bar bf16 near-ties): τ near γ + 1, and
    the target's own time (the generation's time less the drafter's) per committed token well under plain
    decoding's time per token."""
    from specdistill.distill.decoding import Decoder, DecodingConfig
    from specdistill.distill.drafters.token_lm import LMDrafting
    from specdistill.distill.target import FrozenTarget

    model, _ = eval_speed_module().llama8b_models(torch.device("cuda"))
    target, new_tokens = FrozenTarget(model), 48
    plain = Decoder(target, None, DecodingConfig(max_new_tokens=new_tokens))
    speculative = Decoder(target, LMDrafting(model, "cuda"),
                          DecodingConfig(method="chain", gamma=4, max_new_tokens=new_tokens))
    prompts = tiny.prompts[:3]
    for decoder in (plain, speculative):  # warm-up: allocator, kernels
        decoder.generate(prompts[0])
    plain_runs = [plain.generate(prompt) for prompt in prompts]
    runs = [speculative.generate(prompt) for prompt in prompts]
    plain_seconds_per_token = sum(g.seconds for g in plain_runs) / sum(len(g.output_ids) for g in plain_runs)
    target_seconds_per_token = sum(g.verify_seconds for g in runs) / sum(len(g.output_ids) for g in runs)
    tau = sum(sum(g.accept_lengths) for g in runs) / sum(len(g.accept_lengths) for g in runs)
    print(f"8B shape: plain {1 / plain_seconds_per_token:.1f} tokens/s; always-right drafter: τ {tau:.2f}, "
          f"{1 / target_seconds_per_token:.1f} tokens per second of target time, "
          f"{sum(len(g.output_ids) for g in runs) / sum(g.seconds for g in runs):.1f} tokens/s with the drafter's time")
    assert tau > 3, tau
    assert target_seconds_per_token < plain_seconds_per_token / 1.5, (target_seconds_per_token, plain_seconds_per_token)
