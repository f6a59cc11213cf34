"""`specdistill train` (and `run`) on the traps a user walks into: missing keys, Ctrl-C, damaged or partial checkpoints,
resuming with other settings, reruns of finished runs, crashes while saving, divergence, two runs in one folder, a
warm-up longer than the run, datasets without stats.json, typos in `specdistill run` stage lists. Each ends in the right
behaviour or one clear line."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.outputs import LOCK_NAME, json_text, recover_folder, replace_folder
from specdistill.train import train as train_module  # registers the train schema for `compose`
from specdistill.train.optim import announce_schedule, lr_lambda
from tests.conftest import compose, run_cli

# a few steps of a small EAGLE-3 head on the tiny toy target: seconds per run
SMALL = ["target=toy_tiny", "drafter=eagle3", "drafter.draft_vocab_size=512", "objective.ttt_steps=1",
         "train.batch_size=2", "train.eval_batches=1", "optim.lr=2e-3", "optim.warmup_ratio=0.1"]


def train_in_process(out_dir: Path, dataset_dir: Path, *overrides: str) -> Path:
    return train_module.train(compose("train", [*SMALL, f"data_dir={dataset_dir}", f"out_dir={out_dir}", *overrides]))


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "drafter" / "summary.json").read_text())["history"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, toy_dataset) -> Path:
    """A finished 3-step run: checkpoints step_2 and step_3 (keep_last=2; the last step is always checkpointed), its
    drafter at step 3. Copy before use."""
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(out_dir, toy_dataset[0], "train.max_steps=3", "train.checkpoint_every=1")
    return out_dir


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def assert_one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


# --- 1. missing mandatory keys, Ctrl-C ---------------------------------------------------------------------------


def test_train_without_data_dir_names_the_key(tmp_path: Path, cache_dir: Path):
    line = assert_one_line_error(run_cli("train", "target=toy_tiny", f"out_dir={tmp_path}/out", cwd=tmp_path))
    assert line.startswith("error: data_dir is required") and "data_dir=<value>" in line


def test_ctrl_c_ends_with_one_line_and_status_130(toy_dataset, tmp_path: Path):
    out_dir = tmp_path / "out"
    command = [sys.executable, "-c", "from specdistill.cli.main import main; main()", "train", *SMALL,
               f"data_dir={toy_dataset[0]}", f"out_dir={out_dir}", "train.max_steps=1000"]
    # a shell starts background jobs with SIGINT ignored, and children inherit that: restore it, as a terminal has it
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=restore_sigint)
    deadline = time.monotonic() + 120
    while not (out_dir / LOCK_NAME).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the lock is taken once the stage runs: Ctrl-C lands inside it, not in the imports
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"


def test_ctrl_c_turned_into_another_error_by_a_library_still_ends_as_interrupted(capsys):
    # multiprocess (imported by datasets) catches Ctrl-C during its import with a bare `except:` and raises
    # ModuleNotFoundError instead; the interrupt stays in the error's context
    @exit_on_user_error
    def stage() -> None:
        try:
            raise KeyboardInterrupt
        except:  # noqa: E722 - as the library does
            raise ModuleNotFoundError("No module named 'version'")

    with pytest.raises(SystemExit) as exited:
        stage()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"

    @exit_on_user_error
    def crashing_stage() -> None:
        raise ModuleNotFoundError("No module named 'version'")

    with pytest.raises(ModuleNotFoundError):  # without an interrupt it is a real error, traced
        crashing_stage()


# --- 2. damaged and partial checkpoints ---------------------------------------------------------------------------


def test_a_damaged_checkpoint_falls_back_and_leftovers_are_removed(run_copy: Path, toy_dataset, caplog):
    checkpoints = run_copy / "checkpoints"
    shutil.rmtree(run_copy / "drafter")  # as if killed before the end
    (checkpoints / "step_3" / "optimizer.bin").write_bytes(b"not a torch file")
    shutil.copytree(checkpoints / "step_2", checkpoints / "step_7")  # a kill while pruning: state without weights
    (checkpoints / "step_7" / "model.safetensors").unlink()
    (checkpoints / ".step_5.tmp").mkdir()  # the staging folder of a save that never finished
    (checkpoints / "step_9").mkdir()  # an empty step folder

    with caplog.at_level("INFO", logger="specdistill.train"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=3", "train.checkpoint_every=1")
    log = caplog.text
    assert "skipping the checkpoint step_3" in log and "step_3/optimizer.bin" in log
    assert f"resumed from {checkpoints / 'step_2'}" in log
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2", "step_3"]  # step_3 was saved again
    torch.load(checkpoints / "step_3" / "optimizer.bin", weights_only=True)  # loads again
    assert [record["step"] for record in history(run_copy)] == [0, 1, 2, 3]

    # nothing left to fall back to: one line naming the damaged file
    shutil.rmtree(run_copy / "drafter")
    for step in ("step_2", "step_3"):
        (checkpoints / step / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints can be loaded .*step_2/model\.safetensors"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=3", "train.checkpoint_every=1")


# --- 3. and 4. resume=never, changed settings, shrunk max_steps, finished runs ---------------------------------------


def test_a_finished_run_is_not_trained_again_and_changed_settings_are_refused(run_copy: Path, toy_dataset, capsys):
    weights = run_copy / "drafter" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    # logging, evaluation and checkpoint intervals may change
    assert train_in_process(run_copy, toy_dataset[0], "train.max_steps=3", "train.eval_every=7") == run_copy / "drafter"
    assert "already finished at step 3" in capsys.readouterr().out and weights.stat().st_mtime_ns == written

    with pytest.raises(UserError, match=r"started with other settings \(optim\.lr 0\.002 → 0\.01\)"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=3", "optim.lr=0.01")
    with pytest.raises(UserError, match=r"train\.max_steps=2 is below step 3"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=2")
    for unfinished in ("drafter", "checkpoints/step_3"):  # killed in the last step: the checkpoint of step 2 is the newest
        shutil.rmtree(run_copy / unfinished)
    with pytest.raises(UserError, match=r"train\.max_steps=1 is below step 2 of the checkpoint"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=1")
    with pytest.raises(UserError, match=rf"resume=never: out_dir {run_copy} already holds a run \(checkpoints/\).*resume=auto"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=3", "resume=never")
    assert (run_copy / "checkpoints" / "step_2").is_dir()  # the old run is kept


def test_a_resumed_run_with_no_step_left_still_validates(run_copy: Path, toy_dataset, capsys):
    """Resumed at train.max_steps (fewer steps left than train.eval_every): the final record still has validation."""
    for unfinished in ("drafter", "checkpoints/step_3"):  # killed in the last step
        shutil.rmtree(run_copy / unfinished)
    train_in_process(run_copy, toy_dataset[0], "train.max_steps=2", "train.eval_every=100")
    final = history(run_copy)[-1]
    assert final["step"] == 2 and math.isfinite(final["val_top1"])
    assert f"validation top-1 {final['val_top1']:.3f}" in capsys.readouterr().out


# --- 5. saving never loses the previous drafter --------------------------------------------------------------------


def test_replace_folder_keeps_the_old_folder_through_a_crash(tmp_path: Path, monkeypatch):
    final = tmp_path / "drafter"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), replace_folder(final) as staging:  # a crash inside the block
        (staging / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert (final / "model.safetensors").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]

    renames = []
    real_rename = Path.rename

    def rename_then_crash(self: Path, target):
        renames.append(self.name)
        if len(renames) == 2:  # old → .drafter.old happened; the crash comes before staging → drafter
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_crash)
    with pytest.raises(KeyboardInterrupt), replace_folder(final) as staging:
        (staging / "model.safetensors").write_text("new")
    monkeypatch.undo()
    recover_folder(final)  # what the next start of train (or any reader) does
    assert (final / "model.safetensors").read_text() == "old"


def test_a_crash_while_saving_the_drafter_keeps_the_previous_one(run_copy: Path, toy_dataset, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_module.OmegaConf, "to_yaml", crash)  # fails inside the save, after the weights
    with pytest.raises(OSError, match="disk full"):
        train_in_process(run_copy, toy_dataset[0], "train.max_steps=4")
    monkeypatch.undo()
    assert history(run_copy)[-1]["step"] == 3 and (run_copy / "drafter" / "model.safetensors").exists()
    assert not (run_copy / ".drafter.tmp").exists()

    # a crash between the two renames: the next start puts the complete drafter back
    (run_copy / "drafter").rename(run_copy / ".drafter.old")
    assert train_in_process(run_copy, toy_dataset[0], "train.max_steps=3") == run_copy / "drafter"
    assert "already finished at step 3" in capsys.readouterr().out
    load_file(str(run_copy / "drafter" / "model.safetensors"))


# --- 6. divergence ----------------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_with_one_line_and_writes_no_drafter(toy_dataset, tmp_path: Path):
    result = run_cli("train", "target=toy_tiny", "drafter=eagle1", f"data_dir={toy_dataset[0]}", "optim.lr=1e6",
                     "optim.warmup_steps=1", "train.max_steps=30", "train.batch_size=2", "train.eval_batches=1",
                     "train.checkpoint_every=1", f"out_dir={tmp_path}/out", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line.startswith("error: train: step ") and "training diverged" in line and "Lower optim.lr (now 1e+06)" in line
    diverged_at = int(line.split("step ")[1].split(":")[0])
    assert not (tmp_path / "out" / "drafter").exists()
    # no checkpoint holds the weights that diverged (those after step diverged_at − 1)
    kept = [int(path.name.split("_")[1]) for path in (tmp_path / "out" / "checkpoints").glob("step_*")]
    assert all(step < diverged_at - 1 for step in kept), (diverged_at, kept)


def test_json_text_never_writes_bare_nan():
    text = json_text({"loss": float("nan"), "history": [{"grad_norm": float("inf")}, 1.5]})
    assert json.loads(text) == {"loss": None, "history": [{"grad_norm": None}, 1.5]}


# --- 7. one run per out_dir, unique default folders --------------------------------------------------------------------


def test_a_second_run_in_the_same_out_dir_is_refused(toy_dataset, tmp_path: Path):
    holder = "import sys, time\nfrom specdistill.distill.outputs import hold_out_dir\nwith hold_out_dir(sys.argv[1]):\n" \
             "    print('held', flush=True)\n    time.sleep(600)"
    other_run = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert other_run.stdout.readline().strip() == "held"  # another run holds it
        with pytest.raises(UserError, match=rf"out_dir: {tmp_path / 'out'} is in use by another run"):
            train_in_process(tmp_path / "out", toy_dataset[0], "train.max_steps=1")
    finally:
        other_run.kill()
        other_run.wait()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_default_run_folders_differ_per_run_and_agree_across_ranks(tmp_path: Path):
    stamp = [sys.executable, "-c", "from specdistill.distill.outputs import run_stamp; print(run_stamp())"]

    def stamps(**env: str) -> list[str]:
        processes = [subprocess.Popen(stamp, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
                     for _ in range(2)]
        return [process.communicate(timeout=60)[0].strip() for process in processes]

    single = stamps()
    assert single[0] != single[1]  # two runs started in the same second
    ranks = stamps(LOCAL_RANK="0")  # the ranks of one launch share the launcher (here: this process)
    assert ranks[0] == ranks[1] and ranks[0].endswith(f"-{os.getpid()}")


# --- 8. warm-up ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_run_warns_that_its_warm_up_never_ends(toy_dataset, tmp_path: Path):
    result = run_cli("train", "target=toy_tiny", f"data_dir={toy_dataset[0]}", "train.max_steps=2", "train.batch_size=2",
                     "train.eval_batches=1", "drafter.draft_vocab_size=512", f"out_dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "WARNING: the warm-up (optim.warmup_steps=2000: 2000 steps) is as long as the run (train.max_steps=2)" in output
    assert "schedule: lr 3e-05, warm-up 2000 steps" in output
    json.loads((tmp_path / "out" / "drafter" / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON


def test_warmup_ratio_decides_the_warm_up(caplog):
    cfg = compose("train", ["optim.warmup_ratio=0.25", "train.max_steps=40", "data_dir=unused", "out_dir=unused"])
    with caplog.at_level("INFO", logger="specdistill.train"):
        schedule = announce_schedule(cfg.optim, cfg.train.max_steps)
    assert schedule["warmup_steps"] == 10 and "WARNING" not in caplog.text
    factor = lr_lambda(cfg.optim, cfg.train.max_steps)
    assert factor(4) == pytest.approx(0.5) and factor(9) == pytest.approx(1.0)
    with pytest.raises(UserError, match="optim.warmup_ratio: 2.0 is not a fraction"):
        announce_schedule(compose("train", ["optim.warmup_ratio=2"]).optim, 40)


def test_bf16_on_a_cpu_without_native_bf16_warns_and_auto_stays_fp32(caplog):
    from specdistill.train.distributed import resolve_precision

    with caplog.at_level("INFO", logger="specdistill.train"):
        assert resolve_precision("auto", cuda=False) == "no" and resolve_precision("auto", cuda=True) == "bf16"
        assert resolve_precision("bf16", cuda=False, native_bf16=True) == "bf16"
        assert resolve_precision("bf16", cuda=True, native_bf16=False) == "bf16"
        assert "WARNING" not in caplog.text
        assert resolve_precision("bf16", cuda=False, native_bf16=False) == "bf16"  # kept: the user asked for it
    assert "train.mixed_precision=bf16 on a CPU without native bf16 matmuls" in caplog.text
    assert "Set train.mixed_precision=no (or auto)" in caplog.text


# --- 10. a dataset without stats.json ----------------------------------------------------------------------------------


def test_token_ids_are_checked_when_stats_json_is_missing(toy_dataset, tmp_path: Path):
    import datasets

    features = datasets.load_from_disk(str(toy_dataset[0]))["train"].features
    foreign = tmp_path / "foreign"  # prepared for a target with a larger vocabulary; stats.json lost
    rows = {"input_ids": [[1, 2, 70000]], "loss_mask": [[0, 1, 1]]}
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features)
                          for split in ("train", "validation")}).save_to_disk(str(foreign))
    with pytest.raises(UserError, match=rf"data_dir: {foreign} holds token id 70000, .*stats\.json is missing"):
        train_in_process(tmp_path / "out", foreign, "train.max_steps=1")


# --- 11. specdistill run ------------------------------------------------------------------------------------------------


def test_run_checks_every_stage_before_starting_any(tmp_path: Path, cache_dir: Path):
    result = run_cli("run", "experiment=quickstart", 'common=["target=toy_tiny"]', 'eval=["bench=no_such_bench"]',
                     f"out_dir={tmp_path}/out", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line.startswith("error: run: the eval stage does not compose") and "no_such_bench" in line
    assert not (tmp_path / "out" / "prep").exists()  # prep never started


@pytest.mark.slow
def test_the_usage_line_of_run_help_composes(tmp_path: Path, cache_dir: Path):
    help_text = run_cli("run", "--help", cwd=tmp_path).stdout
    [usage] = [line.split("Usage:", 1)[1] for line in help_text.splitlines() if "Usage:" in line]
    args = shlex.split(usage)  # copied from the help as is
    assert args[:2] == ["specdistill", "run"]
    result = run_cli(*args[1:], "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "- drafter=eagle1" in result.stdout and "- train.max_steps=600" in result.stdout
