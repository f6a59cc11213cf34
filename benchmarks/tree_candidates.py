"""Multi-candidate and traversal verification (issue 22, items 2a and 2b): a tree of i.i.d. draws
(`eval.tree_candidates=sampled`) against EAGLE-2's top-k tree at the same size, each verified top-down and by
traversal (`eval.verification=traversal`), sampling at T = 1, side by side in one process.

    python benchmarks/tree_candidates.py --drafter-path runs/q/drafter                     # toy target, toy bench
    python benchmarks/tree_candidates.py --drafter-path /tmp/bed/run/train/drafter \\
        --override target=smollm2_135m_instruct bench=mt_bench --num-prompts 16         # the real bed

Settings, on the same prompts with the same seeds: plain sampling (the baseline), a chain of --gamma sampled drafts
(the reference a tree must beat to be worth its verification cost), then for each --sizes value N
(eval.tree_total_tokens) and --top-ks value k: a tree for each --candidates value (top_k; sampled: i.i.d. draws;
sampled_distinct: draws without replacement), each chain and tree once per --verifications value (traversal is not
run on i.i.d. draws, which it refuses). Every prompt is decoded
--samples times by each setting (the order rotated each prompt, after --warmup untimed prompts). τ = tokens
committed per target forward, nodes = tokens verified per step (mean; a sampled tree may use fewer than N − 1, as
repeated draws share a node), tokens/s = Σ new tokens ÷ Σ seconds, speedup = ÷ plain's, "τ vs today" = τ ÷ the
top-down top-k tree's at the same N and k (a chain: ÷ the top-down chain's). Every verifier is exact
(tests/test_decoding.py's and tests/test_traversal.py's G-tests); the goal is a τ above the top-down top-k tree's.
"""

from __future__ import annotations

import dataclasses
import platform
from datetime import date

import torch

from side_by_side import argument_parser, eval_recipe, interleaved
from specdistill.distill.decoding import Decoder, TreeCandidates, Verification
from specdistill.eval.metrics import summarize


def main() -> None:
    parser = argument_parser(__doc__, warmup=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--depth", type=int, default=6, help="eval.tree_depth")
    parser.add_argument("--top-ks", type=int, nargs="+", default=[4, 10], help="eval.tree_top_k values")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 60], help="eval.tree_total_tokens values")
    parser.add_argument("--gamma", type=int, default=5, help="the reference chain's eval.gamma")
    parser.add_argument("--samples", type=int, default=2, help="decodings per prompt and setting")
    parser.add_argument("--candidates", nargs="+", default=[c.value for c in TreeCandidates],
                        choices=[c.value for c in TreeCandidates], help="eval.tree_candidates values")
    parser.add_argument("--verifications", nargs="+", default=[v.value for v in Verification],
                        choices=[v.value for v in Verification], help="eval.verification values")
    args = parser.parse_args()

    recipe = eval_recipe(args, [f"eval.temperature={args.temperature}", "eval.method=tree", f"eval.tree_depth={args.depth}"])
    proposer = recipe.drafters[str(args.drafter_path)]
    decoders = {"plain": Decoder(recipe.target, None, recipe.decoding, recipe.eos)}
    for verification in args.verifications:
        decoders[f"chain γ={args.gamma} {verification}"] = Decoder(recipe.target, proposer, dataclasses.replace(
            recipe.decoding, method="chain", gamma=args.gamma, verification=verification), recipe.eos)
    for size in args.sizes:
        for top_k in args.top_ks:
            for candidates in args.candidates:
                for verification in args.verifications:
                    if candidates == TreeCandidates.sampled.value and verification == Verification.traversal.value:
                        continue  # refused: traversal needs draws without replacement (sampled_distinct)
                    config = dataclasses.replace(recipe.decoding, tree_total_tokens=size, tree_top_k=top_k,
                                                 tree_candidates=candidates, verification=verification)
                    decoders[f"N={size} k={top_k} {candidates} {verification}"] = Decoder(
                        recipe.target, proposer, config, recipe.eos)
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
    print("| setting | τ | nodes/step | tokens/s | speedup vs plain | τ vs today |")
    print("|---|---|---|---|---|---|")
    plain_speed = next(iter(rows.values()))["baseline_tokens_per_s"]
    print(f"| plain | 1.00 | 0 | {plain_speed:.1f} | 1.00× | — |")
    for label, row in rows.items():
        parts = label.split(" ")  # chain γ=… verification, or N=… k=… candidates verification
        today = rows.get(" ".join([*parts[:2], *([] if parts[0] == "chain" else [TreeCandidates.top_k.value]),
                                   Verification.top_down.value]))
        versus = f"{row['tau'] / today['tau']:.3f}" if today else "—"
        print(f"| {label} | {row['tau']:.3f} | {row['mean_draft_length']:.1f} | {row['tokens_per_s']:.1f} | "
              f"{row['speedup']:.2f}× | {versus} |")


if __name__ == "__main__":
    main()
