"""Parallel drafters beside a sequential one, in one `specdistill eval` per temperature: every drafter and plain decoding
decode the same prompts interleaved, so the speedups are measured side by side. Prints τ, c (one drafter call ÷ one
target step; a parallel drafter's call is its whole round), the round's cost breakdown (ms drafting, ms verifying and
the rest), tokens/s, the speedup over plain decoding and each drafter's speedup ÷ the first drafter's.

    python benchmarks/parallel_drafters.py --out-dir runs/parallel --target toy \
        --drafter EAGLE-3=runs/method_table/eagle3/train_0/drafter --drafter P-EAGLE=runs/.../peagle/train_0/drafter \
        --drafter DFlash=runs/.../dflash/train_0/drafter [--gamma 5] [--num-prompts 20] [--max-new-tokens 96]
    python benchmarks/parallel_drafters.py --out-dir runs/parallel_smollm2 --target smollm2_135m_instruct \
        --drafter ... --override bench=mt_bench bench.num_turns=1 eval.selection=hedge    # the real bed, + hedge

Writes <out-dir>/parallel_drafters.md (the table in BENCHMARKS.md) beside each eval's report.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from stages import specdistill  # benchmarks/stages.py (this script's folder is on sys.path)
from specdistill.distill.reports import read_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--target", default="toy")
    parser.add_argument("--drafter", action="append", required=True, help="LABEL=PATH; the first is the reference")
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--override", nargs="*", default=[], help="more eval overrides (after bench=toy, so "
                        "bench=mt_bench replaces it)")
    args = parser.parse_args()
    labels, paths = zip(*(entry.split("=", 1) for entry in args.drafter))
    label_of = {str(Path(path).resolve()): label for label, path in zip(labels, paths)}
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| T | drafter | τ | c | draft ms / round | verify ms / round | tokens/s | speedup | ÷ first | lossless |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for temperature in (0.0, 1.0):
        eval_dir = out_dir / f"eval_t{temperature:g}"
        if not (eval_dir / "report.json").is_file():
            drafters = ",".join(str(Path(path).resolve()) for path in paths)
            specdistill("eval", f"target={args.target}", "bench=toy", f"drafter_path=[{drafters}]",
                        f"eval.num_prompts={args.num_prompts}", f"eval.max_new_tokens={args.max_new_tokens}",
                        f"eval.gamma={args.gamma}", f"eval.temperature={temperature}", "eval.hf_baselines=false",
                        f"out_dir={eval_dir}", *args.override, log=out_dir / f"eval_t{temperature:g}.log")
        rows = [row for row in read_report(eval_dir, "eval out_dir")["rows"] if row["drafter"] in label_of]
        first = rows[0]["speedup"]
        for row in rows:
            lines.append(f"| {temperature:g} | {label_of[row['drafter']]} | {row['tau']:.2f} | {row['cost_ratio']:.2f} | "
                         f"{row['round_ms']['draft']:.1f} | {row['round_ms']['verify']:.1f} | "
                         f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}× | {row['speedup'] / first:.2f} | "
                         f"{row['lossless_check']} |")
        # MT-Bench's eval skips the check unless eval.verify_lossless=true; the lossless column says which
        assert not any(row["lossless_check"] == "failed" for row in rows), "a lossless check failed"
    lines.append(f"\nTarget: {args.target}; γ = {args.gamma}; {args.num_prompts} prompts × "
                 f"{args.max_new_tokens} new tokens; overrides: {' '.join(args.override) or 'none'}. "
                 f"Machine: {platform.processor() or platform.machine()}, "
                 f"{platform.platform()}; date: {time.strftime('%Y-%m-%d')}.")
    table = "\n".join(lines)
    (out_dir / "parallel_drafters.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
