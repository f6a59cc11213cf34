"""distributed=ddp|zero2|zero3|fsdp on 2 CPU processes (gloo, torchrun): each reaches the drafter weights of one
process with the same global batch and seed, every process trains on its own records, ZeRO-3 and FSDP write per-process
checkpoint shards and resume from them, and a 2-process run killed after a checkpoint resumes to the same drafter.

Tolerance: 1e-5 absolute on every weight after 6 AdamW steps at lr 2e-3 (the sums are split over processes in another
order; measured differences are about 4e-7)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import compose, run_cli

ARGS = ["target=toy_tiny", "drafter=eagle3", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
        "drafter.draft_vocab_size=512", "objective.ttt_steps=2", "optim.lr=2e-3", "optim.warmup_steps=2",
        "train.grad_accum=2", "train.tau_prompts=2", "train.eval_batches=2"]
# ZeRO-3 keeps parameters below this size whole on every process; 0 shards even the toy drafter's
ZERO3_SHARD_ALL = "distributed.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
MODE_ARGS = {"ddp": [], "zero2": ["distributed=zero2"], "zero3": ["distributed=zero3", ZERO3_SHARD_ALL],
             "fsdp": ["distributed=fsdp"]}
# files each process writes into a checkpoint, beside its RNG state (random_states_<rank>.pkl)
PER_PROCESS_FILES = {
    "ddp": [],
    "zero2": ["pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"],
    "zero3": ["pytorch_model/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
              "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"],
    "fsdp": ["pytorch_model_fsdp_0/__{rank}_0.distcp", "optimizer_0/__{rank}_0.distcp"],
}


def torchrun(*args: str) -> list[str]:
    with socket.socket() as probe:  # a free rendezvous port: never collide with another run's default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={port}",
            "-m", "specdistill.train", *args]


def run_two(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun(*args), cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def drafter_summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "drafter" / "summary.json").read_text())


def assert_same_weights(expected: Path, actual: Path, tolerance: float = 1e-5) -> None:
    reference, weights = load_file(str(expected / "model.safetensors")), load_file(str(actual / "model.safetensors"))
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape, name
        difference = (weights[name].double() - tensor.double()).abs().max().item()
        assert difference <= tolerance, (name, difference)


@pytest.fixture(scope="module")
def one_process(toy_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 1 process, micro-batch 4 (the 2-process runs use 2 each: the same global batch)."""
    out_dir = tmp_path_factory.mktemp("one_process")
    result = run_cli("train", *ARGS, f"data_dir={toy_dataset[0]}", "train.batch_size=4", f"out_dir={out_dir}/run",
                     cwd=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir / "run"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_reach_the_weights_of_one(mode, one_process, toy_dataset, tiny, tmp_path: Path):
    out_dir = tmp_path / mode
    run_two(*ARGS, *MODE_ARGS[mode], f"data_dir={toy_dataset[0]}", "train.batch_size=2", f"out_dir={out_dir}",
            cwd=tmp_path)
    assert_same_weights(one_process / "drafter", out_dir / "drafter")
    reference, summary = drafter_summary(one_process), drafter_summary(out_dir)
    for expected, actual in zip(reference["history"], summary["history"]):
        assert actual["loss" if "loss" in expected else "val_top1"] == pytest.approx(
            expected["loss" if "loss" in expected else "val_top1"], rel=1e-4, abs=1e-5)
    assert "val_tau" in summary["final"]  # the decoded τ works on sharded weights too

    # each process trained on its own records; together, the records one process trains on
    first, second = (shard["first_step_records"] for shard in summary["data_shards"])
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(reference["data_shards"][0]["first_step_records"])

    checkpoint = out_dir / "checkpoints" / "step_3"
    for pattern in PER_PROCESS_FILES[mode] + ["random_states_{rank}.pkl"]:
        for rank in (0, 1):
            assert (checkpoint / pattern.format(rank=rank)).is_file(), pattern.format(rank=rank)
    assert not any("target" in path.name for path in checkpoint.rglob("*"))  # the frozen target is never saved

    if mode in ("zero3", "fsdp"):  # resume from the sharded step-3 checkpoint: steps 4-6 again, to the same drafter
        first_drafter = tmp_path / "first_drafter"
        (out_dir / "drafter").rename(first_drafter)
        resumed = run_two(*ARGS, *MODE_ARGS[mode], f"data_dir={toy_dataset[0]}", "train.batch_size=2",
                          f"out_dir={out_dir}", cwd=tmp_path)
        assert "resumed from" in resumed.stderr + resumed.stdout
        again = drafter_summary(out_dir)["history"]
        assert [record["step"] for record in again] == [record["step"] for record in summary["history"]]
        for record, repeated in zip(summary["history"], again):
            if "loss" in record:
                assert repeated["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6)
        assert_same_weights(first_drafter, out_dir / "drafter", tolerance=1e-6)
        # the gathered drafter reloads for decoding, as `specdistill eval` loads it
        from specdistill.distill.drafters import load_drafting

        saved_layers = json.loads((out_dir / "drafter" / "config.json").read_text())["feature_layers"]
        assert load_drafting(str(out_dir / "drafter"), tiny.target, "cpu").feature_layers == tuple(saved_layers)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_killed_two_process_run_resumes_to_the_same_drafter(one_process, toy_dataset, tmp_path: Path):
    out_dir = tmp_path / "killed"
    args = [*ARGS, *MODE_ARGS["zero2"], f"data_dir={toy_dataset[0]}", "train.batch_size=2", f"out_dir={out_dir}"]
    process = subprocess.Popen(torchrun(*args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = out_dir / "checkpoints" / "step_3" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    import psutil

    # the launcher and both workers (torchrun starts them in sessions of their own)
    for each in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        each.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1)  # nothing of the killed run may still be writing
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out_dir / "drafter").exists()

    # on another number of processes it is refused (each process's optimizer shard, RNG state and data share)
    alone = run_cli("train", *args, cwd=tmp_path)
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert "was written by 2 processes, and this run has 1" in alone.stderr
    resumed = run_two(*args, cwd=tmp_path)
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert_same_weights(one_process / "drafter", out_dir / "drafter")


def test_deepspeed_keys_train_owns_are_refused_with_the_key_to_set():
    from specdistill.distill.errors import UserError
    from specdistill.train.config import register_configs
    from specdistill.train.distributed import deepspeed_config

    register_configs()

    cfg = compose("train", ["distributed=zero2", "data_dir=unused", "+distributed.deepspeed.gradient_clipping=1.0"])
    with pytest.raises(UserError, match="gradient_clipping is set by train itself; set optim.grad_clip_norm instead"):
        deepspeed_config(cfg, "no")
    cfg = compose("train", ["distributed=zero2", "data_dir=unused", "distributed.deepspeed.zero_optimization.stage=3"])
    with pytest.raises(UserError, match="contradicts distributed=zero2"):
        deepspeed_config(cfg, "no")
    config = deepspeed_config(compose("train", ["distributed=zero3", "data_dir=unused", "optim.grad_clip_norm=0.7",
                                                "train.batch_size=3", "train.grad_accum=5"]), "bf16")
    assert config["gradient_clipping"] == 0.7 and config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 3


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_sharded_mode_runs_alone_without_a_launcher(one_process, toy_dataset, tmp_path: Path):
    """`specdistill train distributed=zero3` on one process (no torchrun) sets up its own group of one."""
    result = run_cli("train", *ARGS, *MODE_ARGS["zero3"], f"data_dir={toy_dataset[0]}", "train.batch_size=4",
                     f"out_dir={tmp_path}/alone", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(one_process / "drafter", tmp_path / "alone" / "drafter")


@pytest.mark.slow
def test_a_multirun_switches_modes_from_job_to_job(toy_dataset, tmp_path: Path):
    """One process running jobs of every mode in turn: accelerate's state and DeepSpeed's group are reset or kept so
    that each job comes up as asked."""
    result = run_cli("train", "--multirun", "target=toy_tiny", f"data_dir={toy_dataset[0]}", "train.max_steps=2",
                     "train.tau_prompts=1", "train.eval_batches=1", "drafter.draft_vocab_size=512",
                     "distributed=zero3,ddp,zero2,fsdp,zero3", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["jobs"]
    assert len(jobs) == 5 and {job["status"] for job in jobs} == {"complete"}, jobs
