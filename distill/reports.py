"""report.json: what `specdistill eval` writes (eval/report.py) and other stages and tools read (export's model card,
the benchmarks). One schema, one object for any number of drafters:

    {"schema_version": 2, "target": str, "bench": str, "temperature": float, "hardware": str, "config": {...},
     "rows": [row, ...]}

The top level holds what the whole run shares (`RUN_KEYS`: the target, bench, sampling temperature, the machine and
the resolved eval config); `rows` holds one row per drafter evaluated, in the order given, then one per transformers
baseline, each with `ROW_KEYS` (DESIGN.md's definitions):

    drafter, method, tau, alpha_per_position, speedup, predicted_speedup, tokens_per_s, baseline_tokens_per_s,
    cost_ratio, num_prompts, new_tokens, lossless_check ("passed"|"failed"|"skipped"), lossless_check_method,
    skipped_prompts

and may add `accept_length_histogram` (list[int]: decoding steps that committed 1, 2, 3, … tokens),
`mean_draft_length` and `draft_length_histogram` (list[int]: decoding steps that drafted 0, 1, 2, … tokens),
`round_ms` ({"draft", "verify"}: milliseconds per decoding step spent drafting, the drafter's catch-up included, and
on the rest, the target's verify, acceptance and commit with the prefill spread over the steps: a round's cost
breakdown), `per_category` (category → {"tau",
"alpha_per_position", "speedup", "num_prompts"}) and `speedup_over_transformers`
(a drafter's tokens/s ÷ that of transformers' plain greedy `generate` on the same prompts). The row of online
selection (eval.selection=hedge) adds `selection` ({"method": "hedge", "members": {drafter: {"lead_fraction",
"first_position_acceptance"}}, "regret_per_category": {category: {"oracle", "oracle_tau", "tau", "regret"}},
"best_fixed", "regret_overall"}). The row of online adaptation (eval.adaptation=online) adds `adaptation`
({"method": "online", "lr", "steps_per_update", "updates", "update_seconds" (training time, not in tokens/s),
"stream_prompts", "held_out_prompts", "tau_stream", "frozen_tau_stream", "tau_held_out", "frozen_tau_held_out",
"saved_to"}). A number that does not apply (a baseline's τ) or is not finite is null.
"""

from __future__ import annotations

from pathlib import Path

from specdistill.distill.errors import UserError
from specdistill.distill.json_files import read_json

SCHEMA_VERSION = 2
RUN_KEYS = ("target", "bench", "temperature", "hardware", "config")
ROW_KEYS = ("drafter", "method", "tau", "alpha_per_position", "speedup", "predicted_speedup", "tokens_per_s",
            "baseline_tokens_per_s", "cost_ratio", "num_prompts", "new_tokens", "lossless_check",
            "lossless_check_method", "skipped_prompts")


def report_document(run: dict, rows: list[dict]) -> dict:
    """The report.json object of a run's shared fields and its rows, keys in schema order; a ValueError naming what
    is missing (a writer's mistake, not a user's)."""
    if not rows:
        raise ValueError("a report needs at least one row")
    missing_run = [key for key in RUN_KEYS if key not in run]
    if missing_run:
        raise ValueError(f"the report lacks the run keys {missing_run}")
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"the report row of drafter {row.get('drafter')!r} lacks the keys {missing}")
    ordered = [{**{key: row[key] for key in ROW_KEYS}, **row} for row in rows]
    return {"schema_version": SCHEMA_VERSION, **{key: run[key] for key in RUN_KEYS}, "rows": ordered}


def report_rows(report: dict) -> list[dict]:
    """Each row with the run's shared fields but its config merged in: what one line of a table needs."""
    shared = {key: report[key] for key in RUN_KEYS if key != "config" and key in report}
    return [{**shared, **row} for row in report["rows"]]


def read_report(path: Path | str, what: str) -> dict:
    """A report.json `specdistill eval` wrote (or the eval out_dir holding it), or one UserError starting with `what`
    (the key that named it) when it is missing, damaged or of another schema."""
    path = Path(path).expanduser()
    path = path / "report.json" if path.is_dir() else path
    hint = "pass a report.json written by `specdistill eval`, or the eval out_dir holding it"
    report = read_json(path, what, hint)
    if report.get("schema_version") != SCHEMA_VERSION or not isinstance(report.get("rows"), list):
        raise UserError(f"{what}: {path} is not a report.json of schema version {SCHEMA_VERSION} (written by another "
                        "specdistill version); run `specdistill eval` again to write one")
    return report
