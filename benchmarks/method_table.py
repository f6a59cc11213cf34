"""The distillation family side by side on the toy target: the same training budget for every method (300 optimizer
steps × 8 sequences, HASS split 240 + 60 over its two stages), each method's `_toy` preset (conf/experiment/), then
`specdistill eval` on the toy bench (20 prompts, 96 new tokens, chain γ = 5) greedy and at T = 1.

    python benchmarks/method_table.py --out-dir runs/method_table                 # every row (about an hour, 2 cores)
    python benchmarks/method_table.py --out-dir runs/method_table --rows eagle1 fspad
    python benchmarks/method_table.py --out-dir runs/method_table_tiny --target toy_tiny   # the tiny toy: ~5× faster

Rows reuse what an earlier invocation finished (train resume=auto skips a finished run; an eval with a report.json is
not rerun), so a killed run continues. Prints a Markdown table (also written to <out-dir>/method_table.md) with τ
greedy, τ at T = 1 (τ includes the bonus token; plain decoding is 1), the drafter's validation top-1 agreement
(train's last validation; the EAGLE-3 / HASS-on-EAGLE-3 rows count agreement in the target's vocabulary).
method_table.json also keeps each greedy eval's cost ratio c (drafter call ÷ target call), which is only meaningful
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from stages import REPO, specdistill  # benchmarks/stages.py (this script's folder is on sys.path)
from specdistill.distill.reports import read_report

EXPERIMENTS = REPO / "conf" / "experiment"


@dataclass
class Row:
    name: str  # --rows key and folder name
    label: str  # the table's method column
    presets: list[str]  # conf/experiment/<preset>.yaml, trained in order (a later one starts from the one before)
    train_overrides: list[str] = field(default_factory=list)


ROWS = [
    Row("token_ce", "token_lm, hard-label CE", ["distillspec_toy"], ["objective=ce", "objective.data_source=fixed"]),
    Row("token_fkl", "token_lm, forward KL", ["distillspec_toy"], ["objective=fkl", "objective.data_source=fixed"]),
    Row("token_tvd", "token_lm, TVD", ["distillspec_toy"], ["objective=tvd", "objective.data_source=fixed"]),
    Row("token_jsd_on_policy", "token_lm, JSD(0.5), on-policy λ = 0.5", ["distillspec_toy"]),
    Row("eagle1", "EAGLE-1", ["eagle1_toy"]),
    Row("fspad", "FSPAD", ["fspad_toy"]),
    Row("fspad_no_sampling", "FSPAD without feature sampling", ["fspad_toy"], ["drafter.feature_sampling=false"]),
    Row("hass_eagle1", "HASS on EAGLE-1 (stage A 240 + B 60)", ["hass_eagle1_stage_a_toy", "hass_eagle1_stage_b_toy"]),
    Row("eagle3", "EAGLE-3", ["eagle3_toy"]),
    Row("hass_eagle3", "HASS on EAGLE-3 (stage A 240 + B 60)", ["hass_eagle3_stage_a_toy", "hass_eagle3_stage_b_toy"]),
    Row("medusa", "Medusa (5 heads)", ["medusa_toy"]),
    Row("peagle", "P-EAGLE (2 layers, 6 depths, one forward per round)", ["peagle_toy"]),
    Row("dflash", "DFlash (2 layers, blocks of 8, one forward per round)", ["dflash_toy"]),
]


def preset(name: str):
    return OmegaConf.load(EXPERIMENTS / f"{name}.yaml")


def run_row(row: Row, out_dir: Path, data_dir: Path, target: str) -> dict:
    folder = out_dir / row.name
    folder.mkdir(parents=True, exist_ok=True)
    drafter: Path | None = None
    for index, name in enumerate(row.presets):
        stage_dir = folder / f"train_{index}"
        init_from = [f"init_from={drafter}"] if drafter is not None else []
        specdistill("train", f"target={target}", *preset(name).train, *row.train_overrides, *init_from,
                    f"data_dir={data_dir}", f"out_dir={stage_dir}", log=folder / f"train_{index}.log")
        drafter = stage_dir / "drafter"
    summary = json.loads((drafter / "summary.json").read_text())
    result = {"row": row.name, "label": row.label, "val_top1": summary["final"].get("val_top1"),
              "steps": sum(json.loads((folder / f"train_{i}" / "drafter" / "summary.json").read_text())["final"]["step"]
                           for i in range(len(row.presets)))}
    last = preset(row.presets[-1])
    for key, temperature in (("tau_greedy", 0.0), ("tau_t1", 1.0)):
        eval_dir = folder / f"eval_{key}"
        if not (eval_dir / "report.json").is_file():
            specdistill("eval", f"target={target}", *last.eval, f"drafter_path={drafter}", f"eval.temperature={temperature}",
                        "eval.hf_baselines=false", f"out_dir={eval_dir}", log=folder / f"{key}.log")
        report = read_report(eval_dir, "eval out_dir")["rows"][0]  # the drafter's row (transformers' follow)
        result[key] = report["tau"]
        result[f"{key}_cost_ratio"] = report["cost_ratio"]
        result[f"{key}_lossless"] = report["lossless_check"]
    return result


def table(results: list[dict]) -> str:
    lines = ["| method | steps × batch | τ greedy | τ T = 1 | val top-1 |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['steps']} × 8 | {r['tau_greedy']:.2f} | {r['tau_t1']:.2f} | "
                     f"{r['val_top1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--target", default="toy", choices=["toy", "toy_tiny"], help="replaces the presets' target")
    parser.add_argument("--rows", nargs="*", default=[row.name for row in ROWS], choices=[row.name for row in ROWS])
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "prep" / "dataset"
    if not (data_dir / "dataset_dict.json").is_file():
        specdistill("prep", f"target={args.target}", "data=toy_chat", f"out_dir={out_dir / 'prep'}", log=out_dir / "prep.log")
    results = []
    for row in [row for row in ROWS if row.name in args.rows]:
        started = time.perf_counter()
        results.append(run_row(row, out_dir, data_dir, args.target))
        print(f"{row.name}: {json.dumps(results[-1])} ({time.perf_counter() - started:.0f} s)", flush=True)
    text = (f"{table(results)}\n\nTarget: {args.target}. Machine: {platform.processor() or platform.machine()}, {platform.platform()}; "
            f"command: python benchmarks/method_table.py --out-dir {args.out_dir} --target {args.target} "
            f"--rows {' '.join(args.rows)}; "
            f"date: {time.strftime('%Y-%m-%d')}\n")
    (out_dir / "method_table.md").write_text(text)
    (out_dir / "method_table.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
