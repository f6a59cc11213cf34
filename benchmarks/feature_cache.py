"""The offline feature cache on the toy target: bytes per token of bf16 and fp8 caches against the naive cache (bf16,
every cached layer at every position), and EAGLE-3 trained online and from each cache with the same budget (the
`eagle3_toy` preset: 300 steps × 8 sequences, optim.warmup_ratio=0.1, lr 1e-3), then `specdistill eval` (chain
γ = 5, greedy, 20 toy-bench prompts) for τ.

    python benchmarks/feature_cache.py --out-dir runs/feature_cache                   # about an hour on 2 CPU cores
    python benchmarks/feature_cache.py --out-dir runs/feature_cache --target toy_tiny  # minutes

A finished row is not rerun (its result is kept in <out-dir>/<row>.json), so a killed run continues. Prints a
Markdown table (also written to <out-dir>/feature_cache.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from omegaconf import OmegaConf
from stages import REPO, specdistill  # benchmarks/stages.py (this script's folder is on sys.path)
from specdistill.distill.reports import read_report

PRESET = OmegaConf.load(REPO / "conf" / "experiment" / "eagle3_toy.yaml")
ROWS = {"online": None, "bf16 cache": "bf16", "fp8 cache": "fp8"}  # row → cache dtype (None: the target runs)


def prepared(out_dir: Path, target: str, dtype: str) -> tuple[Path, dict, float]:
    """`specdistill prep` with a `dtype` cache (once) → (its out_dir, the cache's manifest, prep's seconds)."""
    folder = out_dir / f"prep_{dtype}"
    seconds_file = folder / "seconds.json"
    if not seconds_file.is_file():
        started = time.perf_counter()
        specdistill("prep", f"target={target}", *PRESET.prep, "features.cache=true", f"features.dtype={dtype}",
                    f"out_dir={folder}", log=out_dir / f"prep_{dtype}.log")
        seconds_file.write_text(json.dumps(time.perf_counter() - started))
    return folder, json.loads((folder / "features" / "manifest.json").read_text()), json.loads(seconds_file.read_text())


def run_row(name: str, dtype: str | None, out_dir: Path, target: str, preps: dict) -> dict:
    result_file = out_dir / f"{name.replace(' ', '_')}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    folder = out_dir / name.replace(" ", "_")
    prep_dir = preps["bf16" if dtype is None else dtype][0]
    source = [] if dtype is None else ["features.source=cache"]
    started = time.perf_counter()
    specdistill("train", f"target={target}", *PRESET.train, *source, f"data_dir={prep_dir / 'dataset'}",
                f"out_dir={folder / 'train'}", log=folder.with_suffix(".train.log"))
    train_seconds = time.perf_counter() - started
    drafter = folder / "train" / "drafter"
    specdistill("eval", f"target={target}", *PRESET.eval, f"drafter_path={drafter}", "eval.temperature=0",
                "eval.hf_baselines=false", f"out_dir={folder / 'eval'}", log=folder.with_suffix(".eval.log"))
    report = read_report(folder / "eval", "eval out_dir")["rows"][0]  # the drafter's row (transformers' follow)
    summary = json.loads((drafter / "summary.json").read_text())
    result = {"row": name, "dtype": dtype, "tau_greedy": report["tau"], "lossless": report["lossless_check"],
              "val_top1": summary["final"].get("val_top1"), "final_loss": summary["final"].get("loss"),
              "train_seconds": train_seconds}
    if dtype is not None:
        manifest, prep_seconds = preps[dtype][1], preps[dtype][2]
        result.update(bytes_per_token=manifest["bytes_per_token"], cache_mb=manifest["file_bytes"] / 1e6,
                      naive_bf16_bytes_per_token=manifest["naive_bf16_bytes_per_token"], layers=manifest["layers"],
                      cache_write_seconds=manifest["seconds"], prep_seconds=prep_seconds)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| features | bytes/token | × naive bf16 | cache | train wall time | final loss | val top-1 | τ greedy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["dtype"] is None:
            size = "— | — | —"
        else:
            size = (f"{r['bytes_per_token']:.0f} | {r['bytes_per_token'] / r['naive_bf16_bytes_per_token']:.2f} | "
                    f"{r['cache_mb']:.0f} MB (written in {r['cache_write_seconds']:.0f} s)")
        lines.append(f"| {r['row']} | {size} | {r['train_seconds']:.0f} s | {r['final_loss']:.4f} | "
                     f"{r['val_top1']:.3f} | {r['tau_greedy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--target", default="toy", choices=["toy", "toy_tiny"])
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    preps = {dtype: prepared(out_dir, args.target, dtype) for dtype in ("bf16", "fp8")}
    results = []
    for name, dtype in ROWS.items():
        results.append(run_row(name, dtype, out_dir, args.target, preps))
        print(f"{name}: {json.dumps(results[-1])}", flush=True)
    naive = preps["bf16"][1]["naive_bf16_bytes_per_token"]
    text = (f"{table(results)}\n\nTarget: {args.target}; cached layers {preps['bf16'][1]['layers']}; naive cache "
            f"(bf16, every cached layer at every position): {naive:.0f} bytes/token. Machine: "
            f"{platform.processor() or platform.machine()}, {platform.platform()}; command: python "
            f"benchmarks/feature_cache.py --out-dir {args.out_dir} --target {args.target}; "
            f"date: {time.strftime('%Y-%m-%d')}\n")
    (out_dir / "feature_cache.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
