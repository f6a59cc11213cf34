"""Sweeps over `specdistill train`: Hydra's --multirun ranks its jobs in sweep_summary.{json,md}, records a failed job
and goes on, and resumes without retraining finished jobs; `specdistill sweep` (Optuna) runs its trials in their
own processes, records failures, and resumes its sqlite study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specdistill.distill.errors import UserError
from specdistill.distill.outputs import mark_stage
from specdistill.cli.sweep import search_distributions
from specdistill.distill.multirun import MissingMetric, read_metric, write_summary

from tests.conftest import run_cli

METRIC = "val_tau"  # τ of the real speculative decoder on validation prompts, in each drafter's summary.json
# a few steps of EAGLE-3 on the tiny toy target, τ decoded on 2 short prompts
TRAIN = ["target=toy_tiny", "drafter.draft_vocab_size=512", "train.max_steps=3", "train.eval_every=3",
         "train.eval_batches=1", "train.batch_size=4", "train.tau_prompts=2", "train.tau.max_new_tokens=16",
         "train.checkpoint_every=1000", "optim.warmup_steps=0"]
LR_SPACE = "search_space={optim.lr:{type:float,low:1e-3,high:1e-2,log:true}}"


def summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())


def drafter_summary(job_dir: Path) -> Path:
    return job_dir / "drafter" / "summary.json"


def assert_ranked(jobs: list[dict]) -> None:
    """Complete jobs first, best metric first, ranks 1..n; then the others, unranked."""
    complete = [job for job in jobs if job["status"] == "complete"]
    assert jobs[: len(complete)] == complete
    assert [job["metric"] for job in complete] == sorted((job["metric"] for job in complete), reverse=True)
    assert [job["rank"] for job in jobs] == [*range(1, len(complete) + 1), *[None] * (len(jobs) - len(complete))]
    for job in complete:  # each metric is the job's own final one
        final = json.loads(drafter_summary(Path(job["out_dir"])).read_text())["final"]
        assert job["metric"] == pytest.approx(final[METRIC])


# ---------------------------------------------------------------------------------------------------------------
# Hydra --multirun


def grid_args(dataset_dir: Path, sweep_dir: Path) -> list[str]:
    return ["train", "--multirun", *TRAIN, f"data_dir={dataset_dir}", "optim.lr=1e-2,3e-3", "objective.ttt_steps=2,3",
            f"hydra.sweep.dir={sweep_dir}"]


@pytest.fixture(scope="module")
def grid(toy_dataset, tmp_path_factory: pytest.TempPathFactory):
    """A 2 × 2 multirun on the toy target → (its arguments, sweep dir, finished process)."""
    tmp = tmp_path_factory.mktemp("grid")
    args = grid_args(toy_dataset[0], tmp / "sweep")
    return args, tmp / "sweep", run_cli(*args, cwd=tmp)


@pytest.mark.slow
def test_multirun_ranks_its_jobs_by_the_metric(grid):
    _, sweep_dir, result = grid
    assert result.returncode == 0, result.stderr[-3000:]
    found = summary(sweep_dir)
    jobs = found["jobs"]
    assert found["metric"] == METRIC and found["direction"] == "maximize" and len(jobs) == 4
    assert {job["status"] for job in jobs} == {"complete"}
    assert_ranked(jobs)
    assert found["best"] == jobs[0]
    # each job's overrides are recorded: the four combinations, each in its own out_dir
    combos = {tuple(o for o in job["overrides"] if o.startswith(("optim.lr=", "objective.ttt_steps="))) for job in jobs}
    assert combos == {(f"optim.lr={lr}", f"objective.ttt_steps={steps}")
                      for lr in ("0.01", "0.003") for steps in (2, 3)}
    assert len({job["out_dir"] for job in jobs}) == 4
    # the task function's return value is the metric; the job wrapper recorded it beside the job
    for job in jobs:
        recorded = json.loads((Path(job["out_dir"]) / "job_result.json").read_text())
        assert recorded["status"] == "complete" and recorded["metric"] == job["metric"]
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [line.split("|")[1].strip() for line in table] == ["1", "2", "3", "4"]
    assert f"Best {METRIC}" in markdown and "sweep: 4 jobs (4 complete, 0 failed)" in result.stdout


@pytest.mark.slow
def test_killed_multirun_resumes_without_retraining_finished_jobs(grid, toy_dataset):
    args, sweep_dir, first = grid
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(summary(sweep_dir)["jobs"], key=lambda job: job["job"])
    finished = {job["job"]: drafter_summary(Path(job["out_dir"])).stat().st_mtime_ns for job in jobs[:3]}
    # the sweep was killed during its last job: that job has no drafter
    lost = Path(jobs[3]["out_dir"])
    shutil.rmtree(lost / "drafter")
    (lost / "job_result.json").unlink()
    (sweep_dir / "sweep_summary.json").unlink()

    again = run_cli(*args, cwd=sweep_dir.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 3  # the finished jobs returned at once ...
    for job in jobs[:3]:  # ... without training again
        assert drafter_summary(Path(job["out_dir"])).stat().st_mtime_ns == finished[job["job"]]
    assert drafter_summary(lost).exists()
    resumed = summary(sweep_dir)["jobs"]
    assert len(resumed) == 4 and {job["status"] for job in resumed} == {"complete"}
    assert_ranked(resumed)

    # ranked by a metric the runs do not have: the finished jobs stay finished, unranked, and their notes name the
    # metrics they have; nothing retrains
    unknown = run_cli(*args, "hydra.callbacks.sweep_summary.metric=val_taux", cwd=sweep_dir.parent)
    assert unknown.returncode == 0, unknown.stderr[-3000:]
    unranked = summary(sweep_dir)
    assert {job["status"] for job in unranked["jobs"]} == {"unranked"} and unranked["best"] is None
    assert all(job["error"] is None and "'val_taux' is not among" in job["note"] and f"{METRIC}," in job["note"]
               for job in unranked["jobs"])
    assert "4 unranked" in unknown.stdout and "hydra.callbacks.sweep_summary.metric=val_tau " in unknown.stdout
    for job in jobs[:3]:
        assert drafter_summary(Path(job["out_dir"])).stat().st_mtime_ns == finished[job["job"]]


@pytest.mark.slow
def test_multirun_jobs_without_the_metric_are_finished_not_failed(toy_dataset, tmp_path: Path):
    """train.tau_prompts=0 measures no decoded τ: the jobs finish, unranked by val_tau, and the summary says which
    metric to rank them by; ranked by it, the same sweep returns the finished jobs at once."""
    sweep_dir = tmp_path / "sweep"
    args = ["train", "--multirun", *TRAIN, "train.tau_prompts=0", f"data_dir={toy_dataset[0]}", "optim.lr=1e-2,3e-3",
            "objective.ttt_steps=2", f"hydra.sweep.dir={sweep_dir}"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = summary(sweep_dir)
    assert found["counts"] == {"unranked": 2} and found["best"] is None
    for job in found["jobs"]:
        assert job["status"] == "unranked" and job["error"] is None and job["rank"] is None
        assert job["note"].startswith(f"metric: '{METRIC}' is not among the final metrics")
        assert "val_tau_proxy" in job["note"]
        assert drafter_summary(Path(job["out_dir"])).exists()
    hint = "hydra.callbacks.sweep_summary.metric=val_tau_proxy"
    assert hint in (sweep_dir / "sweep_summary.md").read_text()
    assert "sweep: 2 jobs (0 complete, 2 unranked, 0 failed)" in result.stdout and hint in result.stdout
    assert "no job completed" not in result.stdout + result.stderr

    ranked = run_cli(*args, hint, cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    assert ranked.stdout.count("already finished") == 2
    found = summary(sweep_dir)
    assert found["metric"] == "val_tau_proxy" and {job["status"] for job in found["jobs"]} == {"complete"}


@pytest.mark.slow
def test_a_multirun_killed_mid_job_resumes_and_completes(toy_dataset, tmp_path: Path):
    """A real kill (the whole process, during the second job), then the same command: the first job is not trained
    again, the interrupted one and the rest finish, and the summary ranks all four."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    sweep_dir = tmp_path / "sweep"
    args = grid_args(toy_dataset[0], sweep_dir)
    args[args.index("train.max_steps=3")] = "train.max_steps=8"  # long enough to be killed inside job 1
    command = [sys.executable, "-c", "from specdistill.cli.main import main; main()", *args]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    first_done = sweep_dir / "0" / "drafter" / "summary.json"
    deadline = time.monotonic() + 300
    while not first_done.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # into job 1
    for each in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        each.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert not (sweep_dir / "sweep_summary.json").exists() and not (sweep_dir / "3").exists()
    first_mtime = first_done.stat().st_mtime_ns

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert first_done.stat().st_mtime_ns == first_mtime  # the finished job returned at once
    jobs = summary(sweep_dir)["jobs"]
    assert len(jobs) == 4 and {job["status"] for job in jobs} == {"complete"}
    assert_ranked(jobs)


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_sweep_goes_on(toy_dataset, tmp_path: Path):
    # job 0 diverges (after its wandb run started), jobs 1 and 3 have a bad warm-up value, job 2 trains
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train", "--multirun", *TRAIN, f"data_dir={toy_dataset[0]}", "objective.ttt_steps=2",
                     "logger=wandb", "optim.lr=1e30,1e-3", "optim.warmup_ratio=0,7", f"hydra.sweep.dir={sweep_dir}",
                     cwd=tmp_path)
    # the sweep ends with status 1 after its summary, and says so on its last line
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"error: sweep: 3 of 4 jobs failed; each job's error is in "
                                                      f"{sweep_dir / 'sweep_summary.md'}")
    jobs = {job["job"]: job for job in summary(sweep_dir)["jobs"]}
    assert [job["status"] for _, job in sorted(jobs.items())] == ["failed", "failed", "complete", "failed"]
    assert jobs[0]["error"].startswith("train: step ") and "training diverged" in jobs[0]["error"]
    for number in (1, 3):
        assert jobs[number]["error"] == "optim.warmup_ratio: 7.0 is not a fraction of train.max_steps (0 to 1)"
    assert jobs[2]["rank"] == 1 and summary(sweep_dir)["best"]["job"] == 2
    assert drafter_summary(sweep_dir / "2").exists() and not (sweep_dir / "0" / "drafter").exists()
    assert result.stderr.count("error: optim.warmup_ratio: 7.0") == 2  # one line each, no traceback
    assert "Traceback" not in result.stderr
    assert "| failed |" in (sweep_dir / "sweep_summary.md").read_text()
    # the diverged job's wandb run was closed as failed before the next job's run started
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # jobs 0 and 2 reached the tracker; 1 and 3 failed before it
    logs = [(run / "logs" / "debug.log").read_text() for run in runs]
    assert "got exitcode: 1" in logs[0] and "got exitcode: 0" in logs[1]


# ---------------------------------------------------------------------------------------------------------------
# specdistill sweep (Optuna)


def sweep_args(dataset_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    overrides = ",".join(f'"{override}"' for override in [*TRAIN, "objective.ttt_steps=2", f"data_dir={dataset_dir}"])
    return ["sweep", f"out_dir={out_dir}", f"train_overrides=[{overrides}]", f"metric={METRIC}", *extra]


def load_study(out_dir: Path):
    import optuna

    return optuna.load_study(study_name="specdistill_sweep", storage=f"sqlite:///{out_dir / 'optuna.db'}")


def states(study) -> list[str]:
    return [trial.state.name for trial in study.get_trials()]


@pytest.mark.slow
def test_optuna_sweep_reports_the_best_trial_and_resumes(toy_dataset, tmp_path: Path):
    import optuna
    from optuna.distributions import FloatDistribution

    out_dir = tmp_path / "sweep"
    first = run_cli(*sweep_args(toy_dataset[0], out_dir, LR_SPACE, "n_trials=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: trial 1/2 optim.lr=" in first.stdout and "sweep: trial 2/2 optim.lr=" in first.stdout
    study = load_study(out_dir)
    assert states(study) == ["COMPLETE", "COMPLETE"]
    finished = {job["job"]: drafter_summary(Path(job["out_dir"])) for job in summary(out_dir)["jobs"]}
    assert len(finished) == 2 and all(path.exists() for path in finished.values())
    mtimes = {number: path.stat().st_mtime_ns for number, path in finished.items()}

    # a kill while the next trial ran left it RUNNING in the study
    interrupted = study.ask({"optim.lr": FloatDistribution(1e-3, 1e-2, log=True)})
    # run again, with room for one more trial: the interrupted one is run again with its own params, nothing else
    again = run_cli(*sweep_args(toy_dataset[0], out_dir, LR_SPACE, "n_trials=3"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 trials done, 1 interrupted (run again)" in again.stdout
    assert f"sweep: trial 3/3 optim.lr={interrupted.params['optim.lr']!r} → {METRIC}" in again.stdout
    study = load_study(out_dir)
    assert states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[3].params == interrupted.params
    for number, path in finished.items():  # the completed trials' jobs were not trained again
        assert path.stat().st_mtime_ns == mtimes[number]

    best = max(trial.value for trial in study.trials if trial.state.name == "COMPLETE")
    found = summary(out_dir)
    assert len(found["jobs"]) == 3 and {job["status"] for job in found["jobs"]} == {"complete"}
    assert found["best"]["metric"] == pytest.approx(best) == study.best_value
    assert_ranked(found["jobs"])
    assert f"sweep: best trial {study.best_trial.number}: {METRIC} {best:#.5g}" in again.stdout

    # the study keeps its metric
    changed = run_cli(*sweep_args(toy_dataset[0], out_dir, LR_SPACE, "n_trials=5", "metric=val_top1"), cwd=tmp_path)
    assert changed.returncode == 2 and changed.stderr.strip().startswith(
        "error: metric: the study 'specdistill_sweep' in"), changed.stderr[-2000:]
    assert "was started with metric=val_tau" in changed.stderr and len(load_study(out_dir).trials) == 4

    # a metric the runs do not have (a new study on the same jobs): Optuna cannot rank the finished trial, so the
    # search stops at once (every trial would lack it alike) with one line naming the metrics the run has; the trial
    # is unranked, not failed
    other = optuna.create_study(study_name="other", storage=f"sqlite:///{out_dir / 'optuna.db'}", direction="maximize")
    other.enqueue_trial(study.best_params)  # a finished job: train returns at once
    other_args = sweep_args(toy_dataset[0], out_dir, LR_SPACE, "n_trials=1", "study_name=other")
    unknown = run_cli(*other_args, "metric=val_taux", cwd=tmp_path)
    assert unknown.returncode == 2
    error = unknown.stderr.strip().splitlines()[-1]
    assert error.startswith("error: metric: trial 0 finished, but 'val_taux' is not among its final metrics (")
    assert f"{METRIC}," in error and "so the search stopped: rank by one of them, e.g. metric=val_tau (" in error
    assert "sweep: trial 1/1 optim.lr=" in unknown.stdout and "→ finished without val_taux" in unknown.stdout
    found = summary(out_dir)
    assert [job["status"] for job in found["jobs"]] == ["unranked"]
    assert "'val_taux' is not among" in found["jobs"][0]["note"]
    # run again with a metric it has: the unranked trial's finished job is read at once, and the study goes on
    again = run_cli(*other_args, f"metric={METRIC}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    other = optuna.load_study(study_name="other", storage=f"sqlite:///{out_dir / 'optuna.db'}")
    assert states(other) == ["FAIL", "COMPLETE"] and other.trials[1].params == study.best_params
    assert other.trials[1].value == pytest.approx(study.best_value)
    for number, path in finished.items():
        assert path.stat().st_mtime_ns == mtimes[number]


@pytest.mark.slow
def test_optuna_sweep_records_a_failed_trial_and_goes_on(toy_dataset, tmp_path: Path):
    import optuna

    out_dir = tmp_path / "sweep"
    out_dir.mkdir()
    mark_stage(out_dir, "sweep")  # the study is the sweep's own, started ahead to queue these trials
    study = optuna.create_study(study_name="specdistill_sweep", storage=f"sqlite:///{out_dir / 'optuna.db'}",
                                direction="maximize")
    study.enqueue_trial({"optim.warmup_ratio": 7.0})  # not a fraction: train refuses it
    study.enqueue_trial({"optim.warmup_ratio": 0.1})
    space = "search_space={optim:{warmup_ratio:{type:categorical,choices:[0.1,7.0]}}}"  # the nested form
    result = run_cli(*sweep_args(toy_dataset[0], out_dir, space, "n_trials=3"), cwd=tmp_path)
    # a trial failed: status 1, after the summary of the two job folders (the third trial draws a value again)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"error: sweep: 1 of 2 jobs failed; each job's error is in "
                                                      f"{out_dir / 'sweep_summary.md'}")
    assert ("sweep: trial 1/3 optim.warmup_ratio=7.0 → failed: optim.warmup_ratio: 7.0 is not a fraction of "
            "train.max_steps (0 to 1) (exit status 2;") in result.stdout
    assert "sweep: trial 2/3 optim.warmup_ratio=0.1 → val_tau" in result.stdout
    study = load_study(out_dir)
    assert len(study.trials) == 3 and states(study)[:2] == ["FAIL", "COMPLETE"]
    found = summary(out_dir)
    failed = next(job for job in found["jobs"] if job["overrides"] == ["optim.warmup_ratio=7.0"])
    assert failed["status"] == "failed" and failed["rank"] is None and "optim.warmup_ratio: 7.0" in failed["error"]
    assert (Path(failed["out_dir"]) / "train.log").read_text().count("error: optim.warmup_ratio") >= 1
    assert found["best"]["overrides"] == ["optim.warmup_ratio=0.1"]
    assert found["best"]["metric"] == pytest.approx(study.best_value)


# ---------------------------------------------------------------------------------------------------------------
# the ranking both sweeps share


@pytest.mark.parametrize("direction, order, best",
                         [("maximize", [2, 0, 3], "2.0000"), ("minimize", [3, 0, 2], "1.0000")])
def test_summary_ranks_complete_jobs_and_lists_failed_ones_last(direction, order, best, tmp_path: Path):
    def row(job, status, metric=None, error=None, note=None):
        return {"job": job, "status": status, "metric": metric, "overrides": ["data_dir=d", f"optim.lr={job}"],
                "out_dir": f"/sweep/{job}", "error": error, "note": note}

    rows = [row(0, "complete", 1.5), row(1, "failed", error="optim.warmup_ratio: 7.0 | bad"), row(2, "complete", 2.0),
            row(3, "complete", 1.0), row(4, "running"),
            {**row(5, "unranked", note="metric: 'val_tau' is not among"), "available": ["loss", "val_tau_proxy"]}]
    ranked = write_summary(tmp_path, rows, "val_tau", direction, "metric")
    assert [job["job"] for job in ranked] == [*order, 1, 4, 5]
    assert [job["rank"] for job in ranked] == [1, 2, 3, None, None, None]
    found = summary(tmp_path)
    assert found["jobs"] == ranked and found["best"]["job"] == order[0]
    assert found["counts"] == {"complete": 3, "unranked": 1, "failed": 1, "running": 1}
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert f"Best val_tau {best}: job {order[0]} (optim.lr={order[0]})." in markdown
    assert "Every job: `data_dir=d`" in markdown  # shared overrides once; each row shows what it varies
    assert f"| 1 | {order[0]} |" in markdown
    assert "| optim.lr=1 | /sweep/1 | optim.warmup_ratio: 7.0 \\| bad |" in markdown  # a | in a cell is escaped
    assert "| unranked | optim.lr=5 | /sweep/5 | metric: 'val_tau' is not among |" in markdown  # its note, not an error
    assert found["unranked"] in markdown and found["unranked"] == (
        "1 of 6 jobs finished without val_tau among their final metrics (they have: loss, val_tau_proxy): rank by one "
        "of them, e.g. metric=val_tau_proxy (finished jobs return at once)")


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line naming the key


@pytest.mark.parametrize("space, message", [
    ({}, "search_space: empty"),
    ({"optim": {}}, "search_space: empty"),
    ({"optim.lr": {"type": "uniform", "low": 0, "high": 1}}, "search_space.optim.lr.type: 'uniform' is not one of"),
    ({"optim.lr": {"type": "float", "low": 1e-4}}, "search_space.optim.lr.high: None is not a number"),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "search_space.optim.lr: "),
    ({"train.batch_size": {"type": "int", "low": 1.5, "high": 4}}, "search_space.train.batch_size.low: 1.5 is not an"),
    ({"drafter": {"type": "categorical", "choices": []}}, "search_space.drafter.choices: give a non-empty list"),
    ({"drafter": {"type": "categorical", "values": ["eagle1"]}}, "search_space.drafter.values: not a field of type"),
    ({"optim.lr": 0.001}, "search_space.optim.lr: 0.001 is not a spec"),
])
def test_bad_search_space_names_the_key(space, message):
    with pytest.raises(UserError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        search_distributions(space)


def test_read_metric_names_the_available_metrics(tmp_path: Path):
    (tmp_path / "drafter").mkdir()
    final = {"step": 3, "val_tau": 1.25, "val_top1": 0.5, "loss": None}
    drafter_summary(tmp_path).write_text(json.dumps({"final": final}))
    assert read_metric(tmp_path / "drafter", "val_tau") == 1.25
    available = r"\(available: step, val_tau, val_top1\)"
    with pytest.raises(MissingMetric, match=r"^metric: 'val_alpha' is not among .* " + available) as missing:
        read_metric(tmp_path / "drafter", "val_alpha")
    assert missing.value.available == ["step", "val_tau", "val_top1"]
    with pytest.raises(UserError, match=r"^metric: 'loss' is None \(not a number\)"):
        read_metric(tmp_path / "drafter", "loss")


@pytest.mark.parametrize("args, message", [
    (["search_space={optim.lr:{type:uniform,low:0,high:1}}"],
     "error: search_space.optim.lr.type: 'uniform' is not one"),
    (["search_space=5"], "error: search_space: 5 is not a dict"),
    (["search_space={optim.lrr:{type:float,low:0.1,high:1}}"],
     "error: train_overrides / search_space: train does not compose (optim.lrr: not a config key (did you mean "
     "optim.lr?)"),
    ([LR_SPACE, "direction=up"], "error: direction: 'up' is not one of maximize, minimize"),
    ([LR_SPACE, 'train_overrides=["target=toy_tiny"]'], "error: train_overrides: data_dir is required but not set"),
])
def test_sweep_refuses_bad_settings_in_one_line(args, message, tmp_path: Path):
    result = run_cli("sweep", f"out_dir={tmp_path}/sweep", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sweep" / "optuna.db").exists()
