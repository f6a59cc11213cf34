"""Nothing a user wrote is lost: a grown run continues where it finished, every stage writes only into an empty
folder, its own, or one the user gave up with overwrite=true, and each refusal is one `error:` line with status 2."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

# a small EAGLE-3 head on the tiny toy target; a constant schedule, so a run's learning rates do not depend on
# train.max_steps and a grown run can equal an uninterrupted one
GROWABLE = ["target=toy_tiny", "drafter=eagle3", "drafter.draft_vocab_size=512", "objective.ttt_steps=1",
            "train.batch_size=2", "train.eval_batches=1", "train.tau_prompts=1", "train.tau.max_new_tokens=8",
            "optim.lr=2e-3", "optim.schedule=constant", "optim.warmup_steps=2", "train.log_every=1"]


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_grown_max_steps_continues_from_the_finished_step(toy_dataset, tmp_path: Path):
    """A 10-step run grown to 12 trains steps 11–12 only and ends where an uninterrupted 12-step run ends (the default
    train.checkpoint_every=500 is longer than both runs)."""
    dataset_dir = toy_dataset[0]
    whole = run_cli("train", *GROWABLE, f"data_dir={dataset_dir}", "train.max_steps=12", f"out_dir={tmp_path}/whole",
                    cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    short = run_cli("train", *GROWABLE, f"data_dir={dataset_dir}", "train.max_steps=10", f"out_dir={tmp_path}/grown",
                    cwd=tmp_path)
    assert short.returncode == 0, short.stderr[-3000:]
    grown = run_cli("train", *GROWABLE, f"data_dir={dataset_dir}", "train.max_steps=12", f"out_dir={tmp_path}/grown",
                    cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr[-3000:]
    output = grown.stdout + grown.stderr
    assert "grew from 10 to 12" in output and f"resumed from {tmp_path / 'grown' / 'checkpoints' / 'step_10'}" in output
    shown_steps = {int(step) for step in re.findall(r"\b(\d+)/12\b", grown.stderr)}  # the progress bar's counts
    assert shown_steps and min(shown_steps) == 10 and max(shown_steps) == 12, sorted(shown_steps)

    expected = load_file(str(tmp_path / "whole" / "drafter" / "model.safetensors"))
    actual = load_file(str(tmp_path / "grown" / "drafter" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


# --- the out_dir rule: export and import --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafter_folder(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    """An (untrained) EAGLE-3 drafter saved as `specdistill train` saves one, inside a run folder of its own."""
    from specdistill.distill.drafters import drafter_kind
    from specdistill.distill.drafters.feature import BuildContext
    from specdistill.distill.outputs import mark_stage

    run = tmp_path_factory.mktemp("run")
    mark_stage(run, "train")
    unit = drafter_kind("eagle3")
    context = BuildContext(tiny.target, token_counts=torch.ones(tiny.target.config.vocab_size, dtype=torch.long),
                           target_name_or_path="toy")
    drafter = unit.model_class.build(unit.options(feature_layers=[0, 1], draft_vocab_size=300), context)
    drafter.save_pretrained(run / "drafter", safe_serialization=True)
    return run / "drafter"


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_export_into_the_run_that_holds_the_drafter_is_refused(drafter_folder: Path, tmp_path: Path):
    before = files_of(drafter_folder.parent)
    for extra in ([], ["overwrite=true"]):  # overwrite gives up what out_dir holds, never the input
        line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm",
                                             f"out_dir={drafter_folder.parent}", *extra, cwd=tmp_path))
        assert line.startswith(f"error: out_dir: {drafter_folder.parent} holds the drafter_path folder"), line
    line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm",
                                         f"out_dir={drafter_folder}", cwd=tmp_path))
    assert line.startswith(f"error: out_dir: {drafter_folder} is the drafter_path folder"), line
    assert files_of(drafter_folder.parent) == before


@pytest.mark.slow
def test_export_and_import_keep_a_users_files_unless_told_to_overwrite(drafter_folder: Path, tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm", f"out_dir={mine}",
                                         cwd=tmp_path))
    assert f"out_dir: {mine} holds files specdistill export did not write (notes.txt)" in line and "overwrite=true" in line
    assert files_of(mine) == {"notes.txt": b"my notes"}

    exported = tmp_path / "exported"
    for _ in range(2):  # export's own folder: written again without asking
        result = run_cli("export", f"drafter_path={drafter_folder}", "format=vllm", f"out_dir={exported}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (exported / "model.safetensors").stat().st_mode & 0o777 == 0o644  # like every other file, not 0600

    # import into an existing drafter (train's) or the user's folder: refused; into a new folder: written
    line = assert_one_line_error(run_cli("import", f"source={exported}", f"out_dir={drafter_folder}", cwd=tmp_path))
    assert f"out_dir: {drafter_folder} holds files specdistill import did not write" in line
    line = assert_one_line_error(run_cli("import", f"source={exported}", f"out_dir={mine}", cwd=tmp_path))
    assert "notes.txt" in line and files_of(mine) == {"notes.txt": b"my notes"}
    # another stage's output folder is named as such
    line = assert_one_line_error(run_cli("import", f"source={exported}", f"out_dir={drafter_folder.parent}", cwd=tmp_path))
    assert f"out_dir: {drafter_folder.parent} holds the output of `specdistill train`" in line

    result = run_cli("export", f"drafter_path={drafter_folder}", "format=vllm", f"out_dir={mine}", "overwrite=true",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (mine / "notes.txt").exists() and (mine / "model.safetensors").is_file()


def test_a_plain_file_as_out_dir_is_refused_and_kept(drafter_folder: Path, tmp_path: Path):
    plain = tmp_path / "results.txt"
    plain.write_text("keep me")
    for stage_args in (["export", f"drafter_path={drafter_folder}", "format=vllm"],
                       ["import", f"source={drafter_folder}"]):
        line = assert_one_line_error(run_cli(*stage_args, f"out_dir={plain}", "overwrite=true", cwd=tmp_path))
        assert line == f"error: out_dir: {plain} is a file, not a folder; give out_dir a folder path (a new one is made)"
    assert plain.read_text() == "keep me" and not (tmp_path / ".results.txt.tmp").exists()


def make_unwritable(folder: Path) -> None:
    """A folder this process cannot write into, even as root (the immutable attribute); undone by the caller."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, f"this test needs chattr (as root) or a non-root user: {result.stderr}"


def make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_export_into_a_folder_it_cannot_write_is_one_line(drafter_folder: Path, tmp_path: Path):
    parent = tmp_path / "locked"
    parent.mkdir()
    make_unwritable(parent)
    try:
        line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm",
                                             f"out_dir={parent / 'export'}", cwd=tmp_path))
    finally:
        make_writable(parent)
    assert line.startswith("error: ") and str(parent) in line and "permissions" in line, line
    assert list(parent.iterdir()) == []  # no staging folder left behind


@pytest.mark.slow
def test_push_options_without_a_repo_and_push_without_a_network_are_one_line(drafter_folder: Path, tmp_path: Path):
    line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm",
                                         f"out_dir={tmp_path / 'a'}", "push.dry_run=true", cwd=tmp_path))
    assert line.startswith("error: push.dry_run is set but push.repo_id is not"), line
    assert not (tmp_path / "a").exists()

    env_backup = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    # no Hub is reachable from here, and from CI: an endpoint on a closed local port fails at once the same way
    os.environ.update(HF_HUB_OFFLINE="0", HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT="http://127.0.0.1:9")
    try:
        line = assert_one_line_error(run_cli("export", f"drafter_path={drafter_folder}", "format=vllm",
                                             f"out_dir={tmp_path / 'b'}", "push.repo_id=me/drafter", cwd=tmp_path))
    finally:
        for key, value in env_backup.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert line.startswith("error: push: cannot reach the Hub to upload to me/drafter"), line
    assert "hf_not_a_real_token" not in line
    assert (tmp_path / "b" / "model.safetensors").is_file()  # the export itself is complete; push it again later


def test_hf_export_hints_fit_the_drafter(tiny, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdistill.distill.drafters import drafter_kind
    from specdistill.export.export import serve_commands

    token_level = drafter_kind("token_lm")
    assert "AutoModelForCausalLM.from_pretrained('lm')" in serve_commands(token_level, "hf", "t", "lm", 3)["python"]
    LlamaForCausalLM(LlamaConfig(vocab_size=tiny.target.config.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "lm")
    line = assert_one_line_error(run_cli("export", f"drafter_path={tmp_path / 'lm'}", "format=sglang",
                                         f"out_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "exports to vllm, hf" in line


def test_fspad_refusal_lists_only_formats_that_take_it(tiny, tmp_path: Path):
    from specdistill.distill.drafters import drafter_kind
    from specdistill.distill.drafters.feature import BuildContext

    unit = drafter_kind("fspad")
    context = BuildContext(tiny.target, token_counts=None, target_name_or_path="toy")
    unit.model_class.build(unit.options(), context).save_pretrained(tmp_path / "fspad", safe_serialization=True)
    line = assert_one_line_error(run_cli("export", f"drafter_path={tmp_path / 'fspad'}", "format=sglang",
                                         f"out_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "this fspad drafter exports to hf;" in line, line


# --- the out_dir rule: prep, train, eval -------------------------------------------------------------------------


@pytest.mark.slow
def test_prep_train_and_eval_keep_a_users_files_and_a_failed_run_leaves_no_folder(toy_dataset, tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    stages = {"prep": ["target=toy_tiny", "data=toy_chat"],
              "train": ["target=toy_tiny", f"data_dir={toy_dataset[0]}", "train.max_steps=1"],
              "eval": ["target=toy_tiny", "drafter_path=/nope"]}
    for stage, args in stages.items():
        line = assert_one_line_error(run_cli(stage, *args, f"out_dir={mine}", cwd=tmp_path))
        assert f"out_dir: {mine} holds files specdistill {stage} did not write (notes.txt)" in line, line
    assert files_of(mine) == {"notes.txt": b"my notes"}

    # a run that fails on its input leaves no empty folder that looks like an output
    missing = tmp_path / "missing.jsonl"
    failed = {"prep": ["target=toy_tiny", f"data.path={missing}"],
              "train": ["target=toy_tiny", f"data_dir={toy_dataset[0]}", "train.batch_size=0"],
              "eval": ["target=toy_tiny", "drafter_path=/nope"]}
    for stage, args in failed.items():
        assert_one_line_error(run_cli(stage, *args, f"out_dir={tmp_path / stage}", cwd=tmp_path))
        assert not (tmp_path / stage).exists(), stage


@pytest.mark.slow
def test_train_refuses_values_it_cannot_use_in_one_line(toy_dataset, tmp_path: Path):
    for override, expected in (("train.batch_size=0", "train.batch_size=0 must be at least 1"),
                               ("optim.lr=-1", "optim.lr=-1.0 must be a positive learning rate"),
                               ("train.grad_accum=0", "train.grad_accum=0 must be at least 1")):
        line = assert_one_line_error(run_cli("train", "target=toy_tiny", f"data_dir={toy_dataset[0]}", override,
                                             f"out_dir={tmp_path / 'out'}", cwd=tmp_path))
        assert line == f"error: {expected}" or line.startswith(f"error: {expected}"), line
