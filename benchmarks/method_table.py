"""The distillation family side by side: the same training budget for every method, each method's preset
(conf/experiment/), then `specdistill eval` greedy and at T = 1.

On the toy targets: the `<method>_toy` presets (300 optimizer steps × 8 sequences, HASS split 240 + 60 over its two
stages), the toy bench (20 prompts, 96 new tokens, chain γ = 5).

    python benchmarks/method_table.py --out-dir runs/method_table                 # every row (about an hour, 2 cores)
    python benchmarks/method_table.py --out-dir runs/method_table --rows eagle1 fspad
    python benchmarks/method_table.py --out-dir runs/method_table_tiny --target toy_tiny   # the tiny toy: ~5× faster

On SmolLM2-135M-Instruct (after `specdistill setup`): the `smollm2_<method>` presets (the 999 regenerated Alpaca
replies, the feature cache, 1,000 steps × 4; bf16 on a GPU, fp32 on a CPU), MT-Bench with both turns, chain γ = 5.
`--steps` scales every row to a shorter shared budget (HASS keeps its 4 : 1 split), `--per-category` evaluates the
first K questions of each MT-Bench category, `--max-new-tokens` shortens each turn:

    python benchmarks/method_table.py --out-dir runs/smollm2_table --target smollm2 --steps 300 --per-category 1 \
        --max-new-tokens 96

Rows reuse what an earlier invocation finished (train resume=auto skips a finished run; an eval with a report.json is
not rerun), so a killed run continues. Prints a Markdown table (also written to <out-dir>/method_table.md) with τ
greedy, τ at T = 1 (τ includes the bonus token; plain decoding is 1), the drafter's validation top-1 agreement
(train's last validation; the EAGLE-3 / HASS-on-EAGLE-3 rows count agreement in the target's vocabulary), the greedy
α per position, the cost ratio c (drafter call ÷ target call), the speedup over our plain decoding (greedy), the
lossless checks and the training wall-clock; `--tree` adds a greedy eval with EAGLE-2's tree (τ, speedup and its
lossless check). c and the speedups are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from stages import REPO, mt_bench_subset, specdistill  # benchmarks/stages.py (this script's folder is on sys.path)
from specdistill.distill.reports import read_report

EXPERIMENTS = REPO / "conf" / "experiment"
TOY_TARGETS = ("toy", "toy_tiny")


@dataclass
class Row:
    name: str  # --rows key and folder name
    label: str  # the table's method column
    methods: list[str]  # presets trained in order (a later one starts from the one before): <method>_toy.yaml on the
    # toy targets, smollm2_<method>.yaml on SmolLM2
    train_overrides: list[str] = field(default_factory=list)


ROWS = [
    Row("token_ce", "token_lm, hard-label CE", ["distillspec"], ["objective=ce", "objective.data_source=fixed"]),
    Row("token_fkl", "token_lm, forward KL", ["distillspec"], ["objective=fkl", "objective.data_source=fixed"]),
    Row("token_tvd", "token_lm, TVD", ["distillspec"], ["objective=tvd", "objective.data_source=fixed"]),
    # on-policy samples need the live target (the feature cache holds the prepared replies only): spelled out, since
    # the SmolLM2 preset trains TVD on fixed data from the cache
    Row("token_jsd_on_policy", "token_lm, JSD(0.5), on-policy λ = 0.5", ["distillspec"],
        ["objective=jsd", "objective.data_source=on_policy", "objective.on_policy_fraction=0.5",
         "features.source=online"]),
    Row("eagle1", "EAGLE-1", ["eagle1"]),
    Row("fspad", "FSPAD", ["fspad"]),
    Row("fspad_no_sampling", "FSPAD without feature sampling", ["fspad"], ["drafter.feature_sampling=false"]),
    Row("hass_eagle1", "HASS on EAGLE-1 (stages A + B, 4 : 1)", ["hass_eagle1_stage_a", "hass_eagle1_stage_b"]),
    # the stop head trains on detached features with its own clip: the EAGLE-3 drafter is the same as without it
    Row("eagle3", "EAGLE-3 (with a stop head, which leaves it unchanged)", ["eagle3"], ["drafter.stop_head=true"]),
    Row("eagle3_31", "EAGLE-3 with the EAGLE 3.1 flags (fc_norm, norm_before_residual)", ["eagle3"],
        ["drafter.fc_norm=true", "drafter.norm_before_residual=true"]),
    Row("hass_eagle3", "HASS on EAGLE-3 (stages A + B, 4 : 1)", ["hass_eagle3_stage_a", "hass_eagle3_stage_b"]),
    Row("medusa", "Medusa (5 heads)", ["medusa"]),
    Row("peagle", "P-EAGLE (2 layers, 6 depths, one forward per round)", ["peagle"]),
    Row("dflash", "DFlash (2 layers, blocks of 8, one forward per round)", ["dflash"]),
]
TOY_ROWS = [row.name for row in ROWS if row.name not in ("token_tvd", "eagle3_31")]  # the table as first measured
SMOLLM2_ROWS = ["eagle1", "fspad", "hass_eagle1", "eagle3", "eagle3_31", "hass_eagle3", "token_tvd", "token_fkl",
                "token_jsd_on_policy", "medusa", "peagle", "dflash"]


def preset_name(method: str, target: str) -> str:
    return f"{method}_toy" if target in TOY_TARGETS else f"{target}_{method}"


def preset(name: str):
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"no preset {path}: that row has no preset for this target")
    return OmegaConf.load(path)


def max_steps(train_overrides: list[str]) -> int:
    return int(next(item for item in train_overrides if item.startswith("train.max_steps=")).split("=", 1)[1])


def stage_budgets(presets: list, steps: int | None) -> list[list[str]]:
    """Each stage's budget overrides: none (the presets' own), or `steps` shared in the presets' proportions, with one
    validation (and τ evaluation) at the end of each stage."""
    if steps is None:
        return [[] for _ in presets]
    own = [max_steps(list(stage.train)) for stage in presets]
    budgets = [max(1, round(steps * count / sum(own))) for count in own]
    return [[f"train.max_steps={count}", f"train.eval_every={count}", f"train.checkpoint_every={count}"]
            for count in budgets]


def target_overrides(stage, target: str) -> list[str]:
    return [f"target={target}"] if target in TOY_TARGETS else list(stage.common)


def run_row(row: Row, out_dir: Path, data_dir: Path, args: argparse.Namespace, eval_extra: list[str]) -> dict:
    folder = out_dir / row.name
    folder.mkdir(parents=True, exist_ok=True)
    presets = [preset(preset_name(method, args.target)) for method in row.methods]
    drafter: Path | None = None
    train_seconds = 0.0
    for index, (stage, budget) in enumerate(zip(presets, stage_budgets(presets, args.steps))):
        stage_dir = folder / f"train_{index}"
        init_from = [f"init_from={drafter}"] if drafter is not None else []
        seconds_file = folder / f"train_{index}.seconds"
        if not (stage_dir / "drafter" / "summary.json").is_file():
            started = time.perf_counter()
            specdistill("train", *target_overrides(stage, args.target), *stage.train, *budget, *row.train_overrides,
                        *args.train_override, *init_from, f"data_dir={data_dir}", f"out_dir={stage_dir}",
                        log=folder / f"train_{index}.log")
            seconds_file.write_text(f"{time.perf_counter() - started:.1f}\n")
        train_seconds += float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
        drafter = stage_dir / "drafter"
    summaries = [json.loads((folder / f"train_{i}" / "drafter" / "summary.json").read_text())
                 for i in range(len(presets))]
    result = {"row": row.name, "label": row.label, "val_top1": summaries[-1]["final"].get("val_top1"),
              "steps": sum(summary["final"]["step"] for summary in summaries),
              "batch": summaries[-1]["settings"].get("train.batch_size"), "train_seconds": train_seconds}
    last = presets[-1]
    # the greedy evals check losslessness (speculative output == plain decoding); at T = 1 that check would be two more
    # greedy decodes of the same thing. The tree is EAGLE-2's, at eval's defaults (depth 6, top-k 10, 60 tokens) unless
    # the preset's eval list sets them (smollm2_medusa: depth 5, as deep as its heads draft).
    evals = {"tau_greedy": (0.0, [], True), "tau_t1": (1.0, ["eval.verify_lossless=false"], not args.greedy_only),
             "tau_tree": (0.0, ["eval.method=tree"], args.tree)}
    for key, (temperature, extra, asked) in evals.items():
        eval_dir = folder / f"eval_{key}"
        if not (eval_dir / "report.json").is_file():
            if not asked:
                continue
            specdistill("eval", *target_overrides(last, args.target), *last.eval, *eval_extra, *extra,
                        f"drafter_path={drafter}", f"eval.temperature={temperature}", "eval.hf_baselines=false",
                        f"out_dir={eval_dir}", log=folder / f"{key}.log")
        report = read_report(eval_dir, "eval out_dir")["rows"][0]  # the drafter's row (transformers' follow)
        result[key] = report["tau"]
        for name in ("cost_ratio", "lossless_check", "speedup", "alpha_per_position"):
            result[f"{key}_{name}"] = report[name]
    return result


def table(results: list[dict]) -> str:
    def number(value, spec: str, suffix: str = "") -> str:  # "—": not measured (e.g. T = 1 under --greedy-only)
        return "—" if value is None else format(value, spec) + suffix

    lines = ["| method | steps × batch | τ greedy | τ T = 1 | τ tree | α per position (greedy) | c | "
             "speedup greedy | speedup T = 1 | speedup tree | val top-1 | lossless (greedy; tree) | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        alphas = " / ".join(number(a, ".2f") for a in r["tau_greedy_alpha_per_position"])
        tree_check = f"; {r['tau_tree_lossless_check']}" if r.get("tau_tree") is not None else ""
        lines.append(f"| {r['label']} | {r['steps']} × {r['batch']} | {r['tau_greedy']:.2f} | "
                     f"{number(r.get('tau_t1'), '.2f')} | {number(r.get('tau_tree'), '.2f')} | {alphas} | "
                     f"{number(r['tau_greedy_cost_ratio'], '.3f')} | {r['tau_greedy_speedup']:.2f}× | "
                     f"{number(r.get('tau_t1_speedup'), '.2f', '×')} | "
                     f"{number(r.get('tau_tree_speedup'), '.2f', '×')} | {number(r['val_top1'], '.3f')} | "
                     f"{r['tau_greedy_lossless_check']}{tree_check} "
                     f"| {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--target", default="toy", choices=[*TOY_TARGETS, "smollm2"],
                        help="toy / toy_tiny: the _toy presets on that target; smollm2: the smollm2_ presets")
    parser.add_argument("--rows", nargs="*", choices=[row.name for row in ROWS],
                        help="default: the target's table (SMOLLM2_ROWS, TOY_ROWS)")
    parser.add_argument("--steps", type=int, help="every row's optimizer steps (default: its presets' own)")
    parser.add_argument("--per-category", type=int, help="MT-Bench: the first K questions of each category")
    parser.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens (default: the presets')")
    parser.add_argument("--greedy-only", action="store_true", help="skip the T = 1 evaluation (a row evaluated at "
                        "T = 1 before keeps it)")
    parser.add_argument("--tree", action="store_true", help="also evaluate greedy with EAGLE-2's tree (eval's "
                        "defaults, or the preset's eval settings; a row evaluated with it before keeps it)")
    parser.add_argument("--train-override", nargs="*", default=[],
                        help="extra train overrides for every row, e.g. train.mixed_precision=no on a CPU without bf16")
    args = parser.parse_args()
    args.rows = args.rows or (SMOLLM2_ROWS if args.target == "smollm2" else TOY_ROWS)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_extra = [f"eval.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else []
    if args.per_category:
        eval_extra.append(f"bench.path={mt_bench_subset(out_dir, args.per_category)}")
    data_dir = out_dir / "prep" / "dataset"
    if not (data_dir / "dataset_dict.json").is_file():
        first = preset(preset_name(next(row for row in ROWS if row.name == args.rows[0]).methods[0], args.target))
        specdistill("prep", *target_overrides(first, args.target), *first.prep, f"out_dir={out_dir / 'prep'}",
                    log=out_dir / "prep.log")
    results = []
    for row in [row for row in ROWS if row.name in args.rows]:
        started = time.perf_counter()
        results.append(run_row(row, out_dir, data_dir, args, eval_extra))
        print(f"{row.name}: {json.dumps(results[-1])} ({time.perf_counter() - started:.0f} s)", flush=True)
    options = "".join(f" --{name.replace('_', '-')} {getattr(args, name)}"
                      for name in ("steps", "per_category", "max_new_tokens") if getattr(args, name))
    if args.train_override:
        options += f" --train-override {' '.join(args.train_override)}"
    if args.greedy_only:
        options += " --greedy-only"
    if args.tree:
        options += " --tree"
    text = (f"{table(results)}\n\nTarget: {args.target}. Machine: {platform.processor() or platform.machine()}, "
            f"{platform.platform()}; command: python benchmarks/method_table.py --out-dir {args.out_dir} "
            f"--target {args.target}{options} --rows {' '.join(args.rows)}; date: {time.strftime('%Y-%m-%d')}\n")
    (out_dir / "method_table.md").write_text(text)
    (out_dir / "method_table.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
