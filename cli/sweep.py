"""Hyperparameter sweeps over `specdistill train`: Hydra's --multirun with a ranked summary, and an Optuna search.

    # Hydra's basic sweeper: every combination, one job after another (jobs in <sweep dir>/<job number>)
    specdistill train --multirun target=toy_tiny data_dir=<prep out>/dataset train.max_steps=300 \
        optim.lr=1e-4,3e-4 objective.ttt_steps=3,7
    specdistill train --multirun ... hydra.sweep.dir=<that sweep's dir>     # resume: finished jobs return at once
    specdistill train --multirun ... hydra.callbacks.sweep_summary.metric=val_top1   # rank by another final metric

    # Optuna (TPE), one train process per trial (jobs in <out_dir>/jobs/<the trial's params>)
    specdistill sweep out_dir=sweeps/lr n_trials=20 \
        'train_overrides=["target=toy_tiny","data_dir=<prep out>/dataset","train.max_steps=300"]' \
        'search_space={optim.lr:{type:float,low:1e-4,high:3e-3,log:true},objective.ttt_steps:{type:int,low:3,high:7}}'
    specdistill sweep ... out_dir=sweeps/lr n_trials=30                     # resume the study; finished trials count

Both write <sweep dir>/sweep_summary.json and sweep_summary.md: the jobs ranked by `metric` (a key of the `final`
dict in each job's drafter/summary.json; default val_tau, τ of the real speculative decoder on validation prompts),
each with its overrides, out_dir, status and, when it failed, its one-line error. A failed job (a bad value, a diverged
run) is recorded and the sweep goes on with the next one. A job that finished without `metric` among its final
metrics (val_tau with train.tau_prompts=0) did not fail: it is `unranked`, its note names the metrics it has, and the
summary says which setting ranks the jobs by the closest one (a re-run returns finished jobs at once). Optuna cannot
learn from such a trial, so `specdistill sweep` stops at the first one (status 2, one line); run again with a metric
the runs have, and the study reads that trial's finished job instead of training it again.

Exit status: 0 when no job failed (unranked ones included), 1 when the summary lists a failed job (after it is
written, with one line on stderr: how many failed, where the summary is), 2 when the sweep itself is refused (a bad
setting of the sweep, or a config that does not compose: nothing trained) or, for Optuna, stopped at an unranked trial.

Multirun: `sweep_job` and the `SweepSummary` callback live in distill/multirun.py (train uses them).

Why Optuna directly and not hydra-optuna-sweeper: the plugin's last release (1.3.0) pins optuna<3, which would hold
the whole environment to a 2022 Optuna, and the plugin is unmaintained. Used directly, Optuna gives us a sqlite study
that a re-run resumes (trials a kill left running are re-enqueued and their jobs continue from their own
checkpoints), simple trials without pruning, and a subprocess per trial, so a crashing trial cannot take the sweep
down.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.hydra_errors import config_error_message
from specdistill.distill.multirun import (DEFAULT_METRIC, MissingMetric, check_direction, exit_if_jobs_failed,
                                          one_line, rank_by, read_metric, report, write_summary)
from specdistill.distill.outputs import claim_out_dir  # + the run-folder resolver

if TYPE_CHECKING:  # optuna is imported only by the `sweep` stage: train's multirun does not need it
    import optuna

# ---------------------------------------------------------------------------------------------------------------
# `specdistill sweep`: Optuna


@dataclass
class SweepConfig:
    out_dir: str = "${hydra:runtime.output_dir}"  # the sweep dir: optuna.db, jobs/<params>/, sweep_summary.{json,md}
    overwrite: bool = False  # write into an out_dir that holds files sweep did not write (distill/outputs.py)
    # train config key (dotted, or nested dicts) → {type: float|int, low, high, log?, step?} | {type: categorical,
    # choices: [...]}. Typed Any, not a dict, so `search_space={...}` on the command line sets new keys (a typed dict
    # would be closed to keys it does not have)
    search_space: Any = None
    n_trials: int = 10  # trials of the study in all: finished ones of an earlier (resumed) run count
    metric: str = DEFAULT_METRIC  # a key of `final` in each job's drafter/summary.json
    direction: str = "maximize"
    train_overrides: list[str] = field(default_factory=list)  # given to every trial, e.g. [target=toy, data_dir=...]
    study_name: str = "specdistill_sweep"
    seed: int = 0  # the TPE sampler's seed


ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)

TRIAL_STATUS = {"COMPLETE": "complete", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
OPTUNA_METRIC_KEY = "metric"  # the sweep's setting that names the metric
SPEC_FIELDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"),
               "categorical": ("choices",)}


def flatten_space(node: dict, prefix: str = "") -> dict[str, Any]:
    """{optim: {lr: spec}} and {optim.lr: spec} both → {"optim.lr": spec}; a spec is the dict with a `type`."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and "type" not in value:
            flat.update(flatten_space(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def distribution(key: str, spec: Any) -> "optuna.distributions.BaseDistribution":
    """One search_space entry as an Optuna distribution; a `UserError` naming the entry's key when it is malformed."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"search_space.{key}"
    if not isinstance(spec, dict):
        raise UserError(f"{where}: {spec!r} is not a spec; write {{type: float|int|categorical, ...}}")
    kind = spec.get("type")
    if kind not in SPEC_FIELDS:
        raise UserError(f"{where}.type: {kind!r} is not one of {', '.join(SPEC_FIELDS)}")
    unknown = sorted(set(spec) - {"type", *SPEC_FIELDS[kind]})
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: not a field of type {kind} (it takes {', '.join(SPEC_FIELDS[kind])})")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise UserError(f"{where}.choices: give a non-empty list of values")
        return CategoricalDistribution(spec["choices"])
    number = int if kind == "int" else (int, float)
    for name in ("low", "high"):
        if isinstance(spec.get(name), bool) or not isinstance(spec.get(name), number):
            expected = "an integer" if kind == "int" else "a number"
            raise UserError(f"{where}.{name}: {spec.get(name)!r} is not {expected}")
    try:  # Optuna's own checks: low ≤ high, log needs low > 0, log excludes step
        if kind == "int":
            return IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)),
                                   step=spec.get("step") or 1)
        return FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)),
                                 step=spec.get("step"))
    except (ValueError, TypeError) as error:
        raise UserError(f"{where}: {one_line(error)}") from None


def search_distributions(space: dict) -> dict[str, "optuna.distributions.BaseDistribution"]:
    flat = flatten_space(space)
    if not flat:
        raise UserError("search_space: empty; give the keys to search, e.g. "
                        "'search_space={optim.lr:{type:float,low:1e-4,high:3e-3,log:true}}'")
    return {key: distribution(key, spec) for key, spec in flat.items()}


def format_value(value: Any) -> str:
    """A parameter value as a Hydra override value; floats by repr, so the text reads back as the same number."""
    from specdistill.cli.run import quoted

    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    return text if re.fullmatch(r"[\w./:+-]+", text) else quoted(text)


def param_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(params[key])}" for key in sorted(params)]


def job_name(params: dict[str, Any]) -> str:
    """The trial's job folder name, from its exact params: a trial re-run with the same params (after a kill, or
    proposed again) finds its own checkpoints or finished drafter there."""
    raw = ",".join(param_overrides(params))
    name = re.sub(r"[^\w.=,+-]", "_", raw)
    if name != raw or len(name) > 120:  # a digest keeps apart names that sanitising or cutting made equal
        name = f"{name[:100]}-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"
    return name


def check_train_overrides(cfg: DictConfig, distributions: dict) -> None:
    """Compose train's config once with the overrides a trial gets, so a typo in a key or a missing data_dir fails
    now, naming the key, not in every trial."""
    from hydra import compose

    from specdistill.train.config import register_configs
    from specdistill.cli.run import quoted

    for override in cfg.train_overrides:
        if "=" not in override:
            raise UserError(f"train_overrides: '{override}' is not key=value")
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "out_dir" or key.startswith("hydra."):
            raise UserError(f"train_overrides: {key} is set per trial (<out_dir>/jobs/<params>); remove '{override}'")
        if key in distributions:
            raise UserError(f"train_overrides: {key} is in search_space too; remove '{override}'")
    for key in distributions:
        if key == "out_dir" or key.startswith("hydra."):
            raise UserError(f"search_space.{key}: set per trial by the sweep; it cannot be searched")
    register_configs()
    first = {key: (dist.choices[0] if hasattr(dist, "choices") else dist.low) for key, dist in distributions.items()}
    overrides = [*cfg.train_overrides, *param_overrides(first), f"out_dir={quoted(Path(cfg.out_dir) / 'jobs')}"]
    try:
        train_cfg = compose("train", overrides)
        OmegaConf.to_container(train_cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"train_overrides / search_space: train does not compose ({config_error_message(error)})"
                        ) from None
    missing = sorted(OmegaConf.missing_keys(train_cfg))
    if missing:
        raise UserError(f"train_overrides: {missing[0]} is required but not set; add {missing[0]}=<value> "
                        "(e.g. data_dir=<prep out>/dataset)")


class TrialFailed(UserError):
    """A trial's train process failed; the message is its last error line."""


def last_error_line(log_path: Path) -> str | None:
    """The last `error: …` line of a train log, else its last line (a traceback's exception)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log_path.read_text(errors="replace")) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [None])[-1]


def run_trial(job_dir: Path, overrides: list[str], metric: str) -> float:
    """`python -m specdistill.train <overrides>` in its own process (a crash ends the trial, not the sweep; a config
    that does not compose ends in one `error:` line, as on the command line), its output appended to
    <job_dir>/train.log; the metric from its drafter's summary.json (a `MissingMetric` when it has none)."""
    from specdistill.cli.run import quoted

    job_dir.mkdir(parents=True, exist_ok=True)
    # Hydra's own files (.hydra/, its log) go beside the job's, not into a new outputs/train/<time> folder
    command = [sys.executable, "-m", "specdistill.train", *overrides, f"out_dir={quoted(job_dir)}",
               f"hydra.run.dir={quoted(job_dir / 'hydra')}"]
    log_path = job_dir / "train.log"
    with log_path.open("a") as log_file:
        log_file.write(f"$ {shlex.join(command)}\n")
        log_file.flush()
        status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if status != 0:
        line = last_error_line(log_path)
        raise TrialFailed(f"{line.removeprefix('error: ') if line else 'train failed'} (exit status {status}; "
                          f"{log_path})")
    return read_metric(job_dir / "drafter", metric)


def counted(trial: "optuna.trial.FrozenTrial") -> bool:
    """Whether a trial counts toward n_trials: it completed, or failed on its own (a kill's are run again, an
    unranked one's are read again)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def resume_interrupted(study: "optuna.Study") -> int:
    """Trials a killed sweep left RUNNING: mark them failed and enqueue their params again, so each job continues
    from its own checkpoints (same params, same job folder). One sweep holds the folder at a time (a lock), so a
    RUNNING trial here was interrupted. Returns how many."""
    from optuna.trial import TrialState

    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in interrupted:
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:  # killed before its params were drawn: nothing to continue
            study.enqueue_trial(trial.params)
    return len(interrupted)


def trial_params(trial: "optuna.trial.FrozenTrial") -> dict[str, Any]:
    """A trial's params; a waiting (enqueued) trial has only its fixed ones."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def reread_unranked(study: "optuna.Study") -> int:
    """Trials that finished without the metric (the search stopped there): enqueue their params again, so the study
    reads each one's finished job (train returns at once) under the metric it has now. Only a job's newest trial: one a
    later trial already re-read is not queued again. Returns how many."""
    trials = study.get_trials(deepcopy=False)
    newest = {job_name(trial_params(trial)): trial.number for trial in trials}
    unranked = [trial for trial in trials
                if "unranked" in trial.user_attrs and newest[job_name(trial.params)] == trial.number]
    for trial in unranked:
        study.enqueue_trial(trial.params)
    return len(unranked)


def study_rows(study: "optuna.Study", out_dir: Path) -> list[dict]:
    """One summary row per job folder, named by its trial's number: the newest trial with those params (a re-run
    after a kill replaces the interrupted one), in trial order."""
    rows: dict[str, dict] = {}
    for trial in study.get_trials(deepcopy=False):
        params = trial_params(trial)
        if not params:
            continue
        name = job_name(params)
        rows.pop(name, None)
        unranked = "unranked" in trial.user_attrs
        status = "unranked" if unranked else TRIAL_STATUS.get(trial.state.name, trial.state.name.lower())
        rows[name] = {"job": trial.number, "status": status,
                      "metric": trial.value if status == "complete" else None,
                      "overrides": param_overrides(params), "out_dir": str(out_dir / "jobs" / name),
                      "error": trial.user_attrs.get("error") or ("interrupted" if status == "failed" else None),
                      "note": trial.user_attrs.get("unranked"),
                      **({"available": trial.user_attrs["available"]} if unranked else {})}
    return list(rows.values())


def sweep(cfg: DictConfig) -> list[dict]:
    """Run (or resume) the study in cfg.out_dir until it has n_trials finished trials; returns the ranked summary
    rows, or exits with status 1 after the summary when a trial failed (module docstring)."""
    check_direction(cfg.direction, "direction")
    if cfg.n_trials < 1:
        raise UserError(f"n_trials: {cfg.n_trials}; give at least 1")
    if not cfg.metric:
        raise UserError("metric: empty; name a key of `final` in the drafter's summary.json (e.g. val_tau)")
    space = cfg.search_space
    if space is not None and not isinstance(space, DictConfig):
        raise UserError(f"search_space: {space!r} is not a dict of train config key → spec, e.g. "
                        "'search_space={optim.lr:{type:float,low:1e-4,high:3e-3,log:true}}'")
    distributions = search_distributions(OmegaConf.to_container(space, resolve=True) if space is not None else {})
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    check_train_overrides(cfg, distributions)

    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    with claim_out_dir(out_dir, "sweep", cfg.overwrite):  # the out_dir rule: a resumed study is sweep's own folder
        study = optuna.create_study(study_name=cfg.study_name, storage=f"sqlite:///{out_dir / 'optuna.db'}",
                                    direction=cfg.direction, load_if_exists=True)
        # a resumed study keeps what its trial values mean (before it has one, its metric may still change)
        started = {"direction": study.direction.name.lower(), "metric": study.user_attrs.get("metric", cfg.metric)}
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            del started["metric"]
        for key, value in started.items():
            if cfg[key] != value:
                raise UserError(f"{key}: the study '{cfg.study_name}' in {out_dir / 'optuna.db'} was started with "
                                f"{key}={value}; keep that, or use another out_dir or study_name")
        study.set_user_attr("metric", cfg.metric)
        # a resumed study seeds on from its trial count: the same seed would draw the first trials' params again
        study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials))
        again = {"interrupted (run again)": resume_interrupted(study),
                 f"unranked (read again for {cfg.metric})": reread_unranked(study)}
        done = sum(counted(trial) for trial in study.get_trials(deepcopy=False))
        if done or any(again.values()):
            print(f"sweep: resuming the study '{cfg.study_name}' in {out_dir}: {done} of {cfg.n_trials} trials done"
                  + "".join(f", {count} {what}" for what, count in again.items() if count), flush=True)

        def summarize() -> list[dict]:
            return write_summary(out_dir, study_rows(study, out_dir), cfg.metric, cfg.direction, OPTUNA_METRIC_KEY)

        while done < cfg.n_trials:
            trial = study.ask(distributions)
            overrides = param_overrides(trial.params)
            progress = f"sweep: trial {done + 1}/{cfg.n_trials} {' '.join(overrides)}"
            try:
                value = run_trial(out_dir / "jobs" / job_name(trial.params), [*cfg.train_overrides, *overrides],
                                  cfg.metric)
            except MissingMetric as missing:  # finished, but with no value Optuna has nothing to learn from: stop
                trial.set_user_attr("unranked", one_line(missing))
                trial.set_user_attr("available", missing.available)
                study.tell(trial, state=TrialState.FAIL)
                print(f"{progress} → finished without {cfg.metric}", flush=True)
                summarize()
                raise UserError(f"metric: trial {trial.number} finished, but '{cfg.metric}' is not among its final "
                                f"metrics ({', '.join(missing.available)}); Optuna cannot rank it, so the search "
                                f"stopped: {rank_by(cfg.metric, missing.available, OPTUNA_METRIC_KEY)}") from None
            except UserError as error:  # the trial failed, or its summary.json cannot be read
                trial.set_user_attr("error", one_line(error))
                study.tell(trial, state=TrialState.FAIL)
                print(f"{progress} → failed: {one_line(error)}", flush=True)
            else:
                study.tell(trial, value)
                print(f"{progress} → {cfg.metric} {value:#.5g}", flush=True)
            done += 1
            summarize()
        ranked = summarize()
    print(report(ranked, cfg.metric, out_dir, OPTUNA_METRIC_KEY), flush=True)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        print(f"sweep: best trial {best.number}: {cfg.metric} {best.value:#.5g} with "
              f"{' '.join(param_overrides(best.params))}", flush=True)
    exit_if_jobs_failed(ranked, out_dir)
    return ranked


@hydra.main(config_path=CONFIG_DIR, config_name="sweep", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sweep(cfg)


if __name__ == "__main__":
    main()
