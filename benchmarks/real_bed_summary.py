"""The markdown BENCHMARKS.md's "A real model on a laptop" quotes, from one `specdistill run` folder (or the same three
stage folders): prep's record and token counts and its two timed passes, the draft vocabulary, τ on the held-out
prompts against training steps, and the MT-Bench report's rows and per-category numbers.

    python benchmarks/real_bed_summary.py runs/smollm2_eagle3          # <out>/prep, <out>/train, <out>/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def prep_lines(prep: Path) -> list[str]:
    stats = json.loads((prep / "dataset" / "stats.json").read_text())
    lines = [f"- prep: {stats['records_kept']} records ({stats['train_records']} train / {stats['validation_records']} "
             f"validation), {stats['tokens']:,} tokens, {stats['masked_fraction']:.1%} under the loss mask; "
             f"read, regenerate and tokenize {stats['seconds'] / 60:.1f} min"]
    manifest_path = prep / "features" / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        lines.append(f"- feature cache: layers {manifest['layers']}, {manifest['dtype']}, "
                     f"{manifest['file_bytes'] / 2**30:.2f} GiB ({manifest['bytes_per_token']:.0f} bytes/token), "
                     f"{manifest['seconds'] / 60:.1f} min")
    return lines


def train_lines(train: Path) -> list[str]:
    summary = json.loads((train / "drafter" / "summary.json").read_text())
    final = summary["final"]
    lines = [f"- train: {final['step']} steps, {final['tokens_trained']:,} tokens; final train top-1 "
             f"{final['train_top1']:.3f}, validation top-1 {final['val_top1']:.3f}", "",
             "| step | val top-1 (TTT step 0 / 1 / 2) | τ (held-out prompts) | α1 / α2 / α3 |", "|---|---|---|---|"]
    for record in summary["history"]:
        if "val_tau" not in record:
            continue
        top1 = " / ".join(f"{record.get(f'val_top1_step{step}', 0):.3f}" for step in range(3))
        alphas = " / ".join(f"{record.get(f'val_alpha_pos{k}', 0):.2f}" for k in (1, 2, 3))
        lines.append(f"| {record['step']} | {top1} | {record['val_tau']:.2f} | {alphas} |")
    return lines


def eval_lines(evaluation: Path) -> list[str]:
    report = json.loads((evaluation / "report.json").read_text())
    lines = ["| row | τ | α per position | tokens/s | speedup over our plain | over transformers' generate | c | "
             "lossless |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        tau = "—" if row["tau"] is None else f"{row['tau']:.2f}"
        alphas = " / ".join(_alpha(alpha) for alpha in row["alpha_per_position"]) or "—"
        over = row.get("speedup_over_transformers")
        cost = row["cost_ratio"]
        lines.append(f"| {Path(str(row['drafter'])).name if row['tau'] is not None else row['drafter']} | {tau} | "
                     f"{alphas} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}× | "
                     f"{'—' if over is None else f'{over:.2f}×'} | {'—' if cost is None else f'{cost:.3f}'} | "
                     f"{row['lossless_check']} |")
    lines += [f"(plain decoding: {report['rows'][0]['baseline_tokens_per_s']:.1f} tokens/s; "
              f"{report['rows'][0]['num_prompts']} prompts, {report['rows'][0]['new_tokens']:,} new tokens)", "",
              "| category | prompts | τ | α1 … α5 | speedup |", "|---|---|---|---|---|"]
    for category, stats in sorted(report["rows"][0].get("per_category", {}).items()):
        alphas = " / ".join(_alpha(alpha) for alpha in stats.get("alpha_per_position") or [])
        lines.append(f"| {category} | {stats['num_prompts']} | {stats['tau']:.2f} | {alphas} | {stats['speedup']:.2f}× |")
    return lines


def _alpha(alpha: float | None) -> str:
    return "—" if alpha is None else f"{alpha:.2f}"  # None: the position was never reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a `specdistill run` out_dir (holding prep/, train/, eval/)")
    run_dir = parser.parse_args().run_dir
    sections = [prep_lines(run_dir / "prep"), train_lines(run_dir / "train")]
    if (run_dir / "eval" / "report.json").exists():
        sections.append(eval_lines(run_dir / "eval"))
    print("\n\n".join("\n".join(lines) for lines in sections))


if __name__ == "__main__":
    main()
