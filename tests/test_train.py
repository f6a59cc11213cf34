"""`specdistill train`: drafters learn on the toy target, a killed run resumes to the same result, bad input is
refused with one clear message before any training step."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModel

import specdistill.distill.drafters  # noqa: F401  (registers the drafter classes with the Auto classes)

from tests.conftest import EAGLE3_FAST, TRAIN_FAST as FAST, run_cli


def summary(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "drafter" / "summary.json").read_text())["history"]


def assert_same_history(expected: list[dict], actual: list[dict], keys: tuple[str, ...], rel: float, abs: float):
    """Two runs logged the same steps, each of `keys` at the same steps (and at one step at least: a renamed metric
    fails), and the same values of them within the tolerance."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for key in keys:
        assert any(key in record for record in expected), f"no record of the reference run has {key!r}"
    for original, again in zip(expected, actual, strict=True):
        for key in keys:
            assert (key in again) == (key in original), (original["step"], key)
            if key in original:
                assert again[key] == pytest.approx(original[key], rel=rel, abs=abs), (original["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_drafter_learns_to_agree_with_the_target(kind, trained_drafter):
    tmp_path, result = trained_drafter(kind)
    assert result.returncode == 0, result.stderr[-3000:]
    history = summary(tmp_path)
    untrained, trained = history[0], history[-1]
    assert untrained["step"] == 0 and trained["step"] == 150
    print(kind, {key: (round(untrained[key], 3), round(trained[key], 3)) for key in trained if key.startswith("val_top1")})
    assert untrained["val_top1"] < 0.05 and trained["val_top1"] > untrained["val_top1"] + 0.12
    if kind == "eagle3":  # the later training-time-test steps learn too
        for step in (1, 2):
            assert trained[f"val_top1_step{step}"] > untrained[f"val_top1_step{step}"] + 0.1
    # τ by the real decoder on validation prompts, beside the proxy: the untrained drafter is almost never accepted
    print(kind, "decoded tau", untrained["val_tau"], "→", trained["val_tau"], "proxy", trained["val_tau_proxy"])
    assert untrained["val_tau"] < 1.1 and trained["val_tau"] > untrained["val_tau"] + 0.15
    # α per draft position the decoding reached, of train.tau.gamma=5
    alphas = {key: value for key, value in trained.items() if key.startswith("val_alpha_pos")}
    assert set(alphas) <= {f"val_alpha_pos{k}" for k in range(1, 6)} and trained["val_alpha_pos1"] > 0.2
    assert all(0 <= alpha <= 1 for alpha in alphas.values())
    assert "val_tau" in result.stderr and "τ" in result.stdout  # the progress bar and the closing line show it
    # the saved drafter reloads through the Auto classes
    drafter = AutoModel.from_pretrained(tmp_path / "drafter")
    assert drafter.config.model_type == f"specdistill_{kind}"
    assert (tmp_path / "drafter" / "model.safetensors").exists() and (tmp_path / "drafter" / "resolved_config.yaml").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_loss(toy_dataset, tmp_path: Path, cache_dir: Path):
    dataset_dir, _ = toy_dataset
    args = ["drafter=eagle3", f"data_dir={dataset_dir}", "train.max_steps=40", "train.eval_every=20",
            *FAST[:-1], *EAGLE3_FAST, "train.checkpoint_every=10", "train.keep_last=2"]
    whole = run_cli("train", *args, f"out_dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # start the same run, kill it once its first checkpoint exists, then start it again: it must resume
    import os

    command = [sys.executable, "-c", "from specdistill.cli.main import main; main()", "train", *args, f"out_dir={tmp_path}/killed"]
    env = dict(os.environ)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "step_10" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "drafter").exists()

    resumed = run_cli("train", *args, f"out_dir={tmp_path}/killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    whole, resumed_run = summary(tmp_path / "whole"), summary(tmp_path / "killed")
    assert_same_history(whole, resumed_run, ("loss", "val_top1"), rel=1e-5, abs=1e-6)
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step_*"))) <= 2  # keep_last


@pytest.mark.slow
def test_bad_inputs_are_refused_before_training(toy_dataset, tmp_path: Path):
    dataset_dir, _ = toy_dataset

    def train(*extra: str) -> subprocess.CompletedProcess:
        result = run_cli("train", "target=toy_tiny", "train.max_steps=1", f"out_dir={tmp_path}/out", *extra, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "out" / "drafter").exists()
        return result

    assert "error: data_dir: /nope does not exist" in train("data_dir=/nope").stderr
    result = train(f"data_dir={dataset_dir}", "drafter=eagle3", "drafter.feature_layers=[0,7]")
    assert "feature_layers: layer id 7 is out of range for a target with 2 layers" in result.stderr
    result = train(f"data_dir={dataset_dir}", "drafter=medusa", "drafter.num_heads=3")  # τ's γ = 5 is refused, not capped
    assert result.stderr.strip().splitlines()[-1] == ("error: train.tau.gamma=5: this drafter (MedusaDrafter) drafts "
                                                      "at most 3 tokens per step; set train.tau.gamma ≤ 3")
    assert "train.tau.top_p=0.0 is out of range" in train(f"data_dir={dataset_dir}", "train.tau.top_p=0").stderr

    other = tmp_path / "other_tokenizer"
    shutil.copytree(dataset_dir, other)
    stats = json.loads((other / "stats.json").read_text())
    stats["tokenizer"].update(fingerprint="0000", name_or_path="someone/else")
    (other / "stats.json").write_text(json.dumps(stats))
    assert "was prepared with another tokenizer (someone/else)" in train(f"data_dir={other}").stderr

    import datasets

    empty = tmp_path / "empty"
    features = datasets.load_from_disk(str(dataset_dir))["train"].features
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"input_ids": [], "loss_mask": []}, features=features)
                          for split in ("train", "validation")}).save_to_disk(str(empty), num_shards={"train": 1, "validation": 1})
    assert f"data_dir: {empty} has no training records" in train(f"data_dir={empty}").stderr

    # a checkpoint left by an EAGLE-1 run cannot be resumed as EAGLE-3
    ok = run_cli("train", "target=toy_tiny", "drafter=eagle1", f"data_dir={dataset_dir}", "train.max_steps=3",
                 "train.checkpoint_every=2", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    shutil.rmtree(tmp_path / "out" / "drafter")
    result = train(f"data_dir={dataset_dir}", "drafter=eagle3", "train.max_steps=5")
    assert "resume: the checkpoint" in result.stderr and "model_type 'specdistill_eagle1' there" in result.stderr


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_train_like_one_with_the_same_global_batch(toy_dataset, tmp_path: Path):
    """DDP on 2 CPU processes (gloo) with micro-batch 2 sees the same global batches as 1 process with 4: with the
    per-token normalisation the losses must match."""
    import os

    dataset_dir, _ = toy_dataset
    args = ["target=toy_tiny", "drafter=eagle3", f"data_dir={dataset_dir}", "train.max_steps=6", "train.eval_every=3",
            "train.checkpoint_every=3", "drafter.draft_vocab_size=512", "objective.ttt_steps=2", "optim.lr=2e-3",
            "optim.warmup_steps=2"]
    single = run_cli("train", *args, "train.batch_size=4", f"out_dir={tmp_path}/one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ)
    import socket

    with socket.socket() as probe:  # a free rendezvous port: never collide with another run's default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={port}",
               "-m", "specdistill.train", *args, "train.batch_size=2", f"out_dir={tmp_path}/two"]
    double = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert_same_history(one, two, ("loss", "tokens_trained"), rel=1e-4, abs=1e-5)
    # argmax agreement of a barely trained drafter flips on float summation order: compare it loosely
    assert_same_history(one, two, ("val_top1",), rel=0, abs=0.02)


@pytest.mark.slow
def test_wandb_logger_records_the_run_offline(toy_dataset, tmp_path: Path):
    dataset_dir, _ = toy_dataset
    result = run_cli("train", "target=toy_tiny", "drafter=eagle1", f"data_dir={dataset_dir}", "train.max_steps=4",
                     "train.log_every=2", "logger=wandb", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    [run] = list((tmp_path / "wandb").glob("offline-run-*"))  # WANDB_MODE=offline is set for every test
    [record] = list(run.glob("run-*.wandb"))  # offline, the config and metrics live in this record file
    content = record.read_bytes()
    assert b"data_dir" in content and b"feature_weight" in content  # the resolved config is logged
    assert b"val_top1" in content  # and the metrics


@pytest.mark.slow
def test_decoded_tau_does_not_change_training(toy_dataset, tmp_path: Path):
    """The decoder drafts from a copy of the weights: runs with and without it train identically."""
    dataset_dir, _ = toy_dataset
    args = ["drafter=eagle1", f"data_dir={dataset_dir}", "train.max_steps=12", "train.eval_every=4",
            "train.eval_batches=1", *FAST]
    runs = {}
    for prompts in (0, 3):
        result = run_cli("train", *args, f"train.tau_prompts={prompts}", f"out_dir={tmp_path}/{prompts}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[prompts] = summary(tmp_path / str(prompts))
    assert all("val_tau" not in record for record in runs[0])
    assert [record["step"] for record in runs[3] if "val_tau" in record] == [0, 4, 8, 12]
    assert_same_history(runs[0], runs[3], ("loss", "val_top1", "grad_norm"), rel=0, abs=0)
