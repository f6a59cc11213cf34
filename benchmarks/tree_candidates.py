"""Multi-candidate verification (issue 22, item 2a): a tree of i.i.d. draws (`eval.tree_candidates=sampled`) against
EAGLE-2's top-k tree at the same size, sampling at T = 1, side by side in one process.

    python benchmarks/tree_candidates.py --drafter-path runs/q/drafter                     # toy target, toy bench
    python benchmarks/tree_candidates.py --drafter-path /tmp/bed/run/train/drafter \\
        --override target=smollm2_135m_instruct bench=mt_bench --num-prompts 16         # the real bed

Settings, on the same prompts with the same seeds: plain sampling (the baseline), a chain of --gamma sampled drafts
(the reference a tree must beat to be worth its verification cost), then for each --sizes value N
(eval.tree_total_tokens) and --top-ks value k: the top-k tree and the sampled tree. Every prompt is decoded
--samples times by each setting (the order rotated each prompt, after --warmup untimed prompts). τ = tokens
committed per target forward, nodes = tokens verified per step (mean; a sampled tree may use fewer than N − 1, as
repeated draws share a node), tokens/s = Σ new tokens ÷ Σ seconds, speedup = ÷ plain's. Both verifiers are exact
(tests/test_decoding.py's G-tests); the goal is a τ above the top-k tree's at the same N.
"""

from __future__ import annotations

import dataclasses
import platform
from datetime import date

import torch

from side_by_side import argument_parser, eval_recipe, interleaved
from specdistill.distill.decoding import Decoder, TreeCandidates
from specdistill.eval.metrics import summarize


def main() -> None:
    parser = argument_parser(__doc__, warmup=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--depth", type=int, default=6, help="eval.tree_depth")
    parser.add_argument("--top-ks", type=int, nargs="+", default=[4, 10], help="eval.tree_top_k values")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 60], help="eval.tree_total_tokens values")
    parser.add_argument("--gamma", type=int, default=5, help="the reference chain's eval.gamma")
    parser.add_argument("--samples", type=int, default=2, help="decodings per prompt and setting")
    args = parser.parse_args()

    recipe = eval_recipe(args, [f"eval.temperature={args.temperature}", "eval.method=tree", f"eval.tree_depth={args.depth}"])
    proposer = recipe.drafters[str(args.drafter_path)]
    decoders = {"plain": Decoder(recipe.target, None, recipe.decoding, recipe.eos),
                f"chain γ={args.gamma}": Decoder(recipe.target, proposer, dataclasses.replace(
                    recipe.decoding, method="chain", gamma=args.gamma), recipe.eos)}
    for size in args.sizes:
        for top_k in args.top_ks:
            for candidates in TreeCandidates:
                config = dataclasses.replace(recipe.decoding, tree_total_tokens=size, tree_top_k=top_k,
                                             tree_candidates=candidates)
                decoders[f"N={size} k={top_k} {candidates.value}"] = Decoder(recipe.target, proposer, config, recipe.eos)
    runs = interleaved(recipe, decoders, args.warmup, samples=args.samples)

    categories = [prompt.category for prompt in recipe.prompts[args.warmup:] for _ in range(args.samples)]
    plain = runs.pop("plain")
    rows = {label: summarize(generations, plain, categories, decoders[label].config.draft_depth)
            for label, generations in runs.items()}
    cfg = recipe.cfg
    print(f"\n{cfg.target.name_or_path} · bench {cfg.bench.name} · {len(plain)} decodings "
          f"({args.num_prompts} prompts × {args.samples}) · {args.max_new_tokens} new tokens a turn · "
          f"T={args.temperature} · depth {args.depth} · {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads · {date.today()}\n")
    print("| setting | τ | nodes/step | tokens/s | speedup vs plain | τ vs top_k |")
    print("|---|---|---|---|---|---|")
    plain_speed = next(iter(rows.values()))["baseline_tokens_per_s"]
    print(f"| plain | 1.00 | 0 | {plain_speed:.1f} | 1.00× | — |")
    for label, row in rows.items():
        top_k = rows.get(label.replace(TreeCandidates.sampled.value, TreeCandidates.top_k.value))
        versus = f"{row['tau'] / top_k['tau']:.3f}" if label.startswith("N=") else "—"
        print(f"| {label} | {row['tau']:.3f} | {row['mean_draft_length']:.1f} | {row['tokens_per_s']:.1f} | "
              f"{row['speedup']:.2f}× | {versus} |")


if __name__ == "__main__":
    main()
