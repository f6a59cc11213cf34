"""Hydra --multirun job results and their ranked summary, for any stage's sweep (`specdistill train --multirun`, and
`specdistill sweep`, cli/sweep.py, which reads the same results).

`sweep_job` wraps a stage's Hydra task function. In a --multirun job it returns the metric, records the result in
<job dir>/job_result.json, and turns a failure into a recorded result instead of an exception (Hydra's sweeper
re-raises a job's exception and ends the sweep, and `exit_on_user_error` would exit the process). The `SweepSummary`
callback (conf/train.yaml: hydra.callbacks.sweep_summary) ranks those files when the sweep ends. A single run is
passed through untouched: one error line, exit status 2.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from specdistill.distill.errors import UserError
from specdistill.distill.json_files import read_json
from specdistill.distill.outputs import json_text, write_text_atomic

log = logging.getLogger("specdistill.sweep")
DEFAULT_METRIC = "val_tau"
DIRECTIONS = ("maximize", "minimize")
SUMMARY_NAME = "sweep_summary"
JOB_RESULT = "job_result.json"
CALLBACK_NAME = "sweep_summary"  # the callback's key under hydra.callbacks (conf/train.yaml)
MULTIRUN_METRIC_KEY = f"hydra.callbacks.{CALLBACK_NAME}.metric"
# a job's status in the summary; unranked: finished, but without the metric among its final metrics
STATUSES = ("complete", "unranked", "failed", "running", "waiting")


# ---------------------------------------------------------------------------------------------------------------
# What both sweeps share: the metric of a finished job, and the ranked summary


def one_line(error: BaseException | str) -> str:
    """An error message on one line (the summary's `error` column, the progress lines)."""
    return " ".join(str(error).split())


class MissingMetric(UserError):
    """A finished run's summary has no number `metric`: the job cannot be ranked by it, but it did not fail."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(message)
        self.available = available  # the numeric keys of its `final`


def read_metric(drafter: Path, metric: str) -> float:
    """`final[metric]` of a finished train run's <drafter>/summary.json; a `MissingMetric` naming the available
    metrics when it has no such number, a `UserError` when the file cannot be read."""
    path = drafter / "summary.json"
    final = read_json(path, "sweep").get("final")
    if not isinstance(final, dict):
        raise UserError(f"sweep: {path} holds no final metrics (no `final` object)")
    value = final.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        available = sorted(key for key, item in final.items()
                           if isinstance(item, (int, float)) and not isinstance(item, bool))
        found = "is not among" if metric not in final else f"is {value!r} (not a number) in"
        raise MissingMetric(f"metric: '{metric}' {found} the final metrics in {path} (available: "
                            f"{', '.join(available)})", available)
    return float(value)


def write_summary(sweep_dir: Path, rows: list[dict], metric: str, direction: str, metric_key: str) -> list[dict]:
    """Rank the jobs (complete ones by `metric`, best first; ties and the others keep their order), write
    <sweep_dir>/sweep_summary.json and .md, and return the ranked rows. Each row: job, status
    (complete|unranked|failed|running|waiting), metric, overrides (key=value strings), out_dir, error; an unranked
    one also its note and the metrics it has (available). `metric_key` is the setting that names the metric."""
    complete = sorted((row for row in rows if row["status"] == "complete"), key=lambda row: row["metric"],
                      reverse=direction == "maximize")
    ranked = [{**row, "rank": rank} for rank, row in enumerate(complete, 1)]
    ranked += [{**row, "rank": None} for row in rows if row["status"] != "complete"]
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    summary = {"metric": metric, "direction": direction, "best": ranked[0] if complete else None,
               "counts": {status: count for status, count in counts.items() if count},
               "unranked": unranked_note(ranked, metric, metric_key), "jobs": ranked}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / f"{SUMMARY_NAME}.json", json_text(summary, indent=1))
    write_text_atomic(sweep_dir / f"{SUMMARY_NAME}.md", summary_markdown(summary))
    return ranked


def summary_markdown(summary: dict) -> str:
    """The summary as a Markdown table; overrides every job shares are listed once above it."""
    jobs, metric = summary["jobs"], summary["metric"]
    shared = shared_overrides(jobs)
    lines = [f"# Sweep: {metric} ({summary['direction']})", "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in summary["counts"].items()) + "."]
    if summary["best"] is not None:
        lines.append(f"Best {describe_best(summary['best'], metric, shared)}.")
    if summary["unranked"]:
        lines.append(f"{summary['unranked']}.")
    if shared:
        lines += ["", "Every job: " + " ".join(f"`{override}`" for override in shared)]
    lines += ["", f"| rank | job | {metric} | status | overrides | out_dir | error / note |",
              "|---|---|---|---|---|---|---|"]
    for job in jobs:
        cells = [job["rank"] or "", job["job"], "" if job["metric"] is None else f"{job['metric']:#.5g}", job["status"],
                 " ".join(o for o in job["overrides"] if o not in shared), job["out_dir"],
                 job.get("error") or job.get("note") or ""]
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def shared_overrides(jobs: list[dict]) -> list[str]:
    """The overrides every job has (listed once, so each job shows only what it varies)."""
    if len(jobs) < 2:
        return []
    return [override for override in jobs[0]["overrides"] if all(override in job["overrides"] for job in jobs)]


def describe_best(best: dict, metric: str, shared: list[str]) -> str:
    """`<metric> <value>: job <n> (<the overrides it varies>)`, as the summary and the console line show the best job."""
    varied = " ".join(override for override in best["overrides"] if override not in shared) or "no overrides"
    return f"{metric} {best['metric']:#.5g}: job {best['job']} ({varied})"


def rank_by(metric: str, available: list[str], metric_key: str) -> str:
    """How to rank jobs that lack `metric`: by the available metric closest to it."""
    closest = difflib.get_close_matches(metric, available, n=1, cutoff=0) or ["<one of them>"]
    return f"rank by one of them, e.g. {metric_key}={closest[0]} (finished jobs return at once)"


def unranked_note(rows: list[dict], metric: str, metric_key: str) -> str | None:
    """What the summary and the console say of the jobs that finished without `metric`: how many, the metrics they
    all have, and the setting that ranks them; None when there are none."""
    unranked = [row for row in rows if row["status"] == "unranked"]
    if not unranked:
        return None
    available = sorted(set.intersection(*(set(row["available"]) for row in unranked)))
    return (f"{len(unranked)} of {len(rows)} jobs finished without {metric} among their final metrics (they have: "
            f"{', '.join(available)}): {rank_by(metric, available, metric_key)}")


def report(ranked: list[dict], metric: str, summary_dir: Path, metric_key: str) -> str:
    """One line for the console: how many jobs ended how, the best one (or how to rank unranked ones), where the
    summary is."""
    counts = {status: sum(row["status"] == status for row in ranked) for status in STATUSES}
    best = next((row for row in ranked if row["status"] == "complete"), None)
    ended = [f"{counts['complete']} complete", *([f"{counts['unranked']} unranked"] if counts["unranked"] else []),
             f"{counts['failed']} failed"]
    parts = [f"sweep: {len(ranked)} jobs ({', '.join(ended)})"]
    if best is not None:
        parts.append(f"best {describe_best(best, metric, shared_overrides(ranked))}")
    elif not counts["unranked"]:
        parts.append("no job completed")
    parts += [note for note in [unranked_note(ranked, metric, metric_key)] if note]
    return "; ".join([*parts, f"wrote {summary_dir / (SUMMARY_NAME + '.md')}"])


def exit_if_jobs_failed(ranked: list[dict], summary_dir: Path) -> None:
    """The sweep's exit status (module docstring): 1, with one line on stderr, when the summary lists a failed job."""
    failed = sum(row["status"] == "failed" for row in ranked)
    if failed:
        print(f"error: sweep: {failed} of {len(ranked)} jobs failed; each job's error is in "
              f"{summary_dir / (SUMMARY_NAME + '.md')}", file=sys.stderr, flush=True)
        sys.exit(1)


def check_direction(direction: str, key: str) -> None:
    if direction not in DIRECTIONS:
        raise UserError(f"{key}: '{direction}' is not one of {', '.join(DIRECTIONS)}")


# ---------------------------------------------------------------------------------------------------------------
# Hydra --multirun: the job wrapper and the summary callback


def finish_wandb_run() -> None:
    """Close a failed job's wandb run, marked failed: the recipe's `end_run` runs only on success, and the next
    job in this process would otherwise log into the open run."""
    wandb = sys.modules.get("wandb")  # never imported: no run to close
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def sweep_job(task: Callable[[DictConfig], Path]) -> Callable[[DictConfig], Any]:
    """Wrap train's Hydra task function (`task(cfg)` returns the drafter folder). In a --multirun job: return the
    job's metric, record it, the metrics a job without it has, or the job's one-line failure in
    <job dir>/job_result.json, and never raise, so the sweep goes on (module docstring). Outside --multirun: `task`
    unchanged."""

    @functools.wraps(task)
    def job(cfg: DictConfig) -> Any:
        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return task(cfg)
        hydra_cfg = HydraConfig.get()
        metric = (hydra_cfg.callbacks.get(CALLBACK_NAME) or {}).get("metric", DEFAULT_METRIC)
        result_path = Path(hydra_cfg.runtime.output_dir) / JOB_RESULT
        row = {"job": hydra_cfg.job.num, "metric": None, "overrides": list(hydra_cfg.overrides.task),
               "out_dir": str(Path(cfg.out_dir).expanduser().resolve()), "error": None, "note": None}
        # a result of an earlier sweep never outlives a re-run; the new one is written when the job ends, not before:
        # train refuses an out_dir holding files it did not write (distill/outputs.py)
        result_path.unlink(missing_ok=True)
        try:
            value = read_metric(task(cfg), metric)
        except MissingMetric as missing:  # finished: kept, unranked; the summary says how to rank it
            print(f"sweep: job {hydra_cfg.job.num} finished without {metric} among its final metrics (it has: "
                  f"{', '.join(missing.available)})", flush=True)
            write_text_atomic(result_path, json_text({"status": "unranked", **row, "note": one_line(missing),
                                                      "available": missing.available}, indent=1))
            return None
        except Exception as error:  # any failure ends this job only (Ctrl-C, not an Exception, ends the sweep)
            message = one_line(error) if isinstance(error, UserError) else f"{type(error).__name__}: {one_line(error)}"
            if not isinstance(error, UserError):  # a bug, not a bad setting: the traceback goes to the job's log
                log.error("job %s failed", hydra_cfg.job.num, exc_info=error)
            print(f"error: {message}\nsweep: job {hydra_cfg.job.num} failed; going on with the next job",
                  file=sys.stderr, flush=True)
            finish_wandb_run()
            write_text_atomic(result_path, json_text({"status": "failed", **row, "error": message}, indent=1))
            return None
        write_text_atomic(result_path, json_text({"status": "complete", **row, "metric": value}, indent=1))
        return value

    return job


class SweepSummary(Callback):
    """After a --multirun sweep, rank its jobs' job_result.json files into <sweep dir>/sweep_summary.{json,md}, then
    exit with status 1 when a job failed. Registered in conf/train.yaml as hydra.callbacks.sweep_summary (metric,
    direction)."""

    def __init__(self, metric: str = DEFAULT_METRIC, direction: str = "maximize") -> None:
        self.metric, self.direction = metric, direction

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # before any job trains: a typo here would only show after the whole sweep
            check_direction(self.direction, f"hydra.callbacks.{CALLBACK_NAME}.direction")
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).expanduser()
        # every job of this sweep dir, a resumed sweep's earlier jobs included (their dirs hold their results)
        rows = sorted((json.loads(path.read_text()) for path in sweep_dir.rglob(JOB_RESULT)),
                      key=lambda row: row["job"])
        ranked = write_summary(sweep_dir, rows, self.metric, self.direction, MULTIRUN_METRIC_KEY)
        print(report(ranked, self.metric, sweep_dir, MULTIRUN_METRIC_KEY), flush=True)
        exit_if_jobs_failed(ranked, sweep_dir)
