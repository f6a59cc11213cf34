"""Dynamic draft length (issue 22, items 1a and 1b) against every fixed chain length, side by side in one process.

    python benchmarks/draft_length.py --drafter-path runs/q/drafter                        # toy target, toy bench
    python benchmarks/draft_length.py --drafter-path /tmp/bed/run/train/drafter \\
        --override target=smollm2_135m_instruct bench=mt_bench --num-prompts 16            # the real bed

Settings, all greedy chains on the same prompts (both turns of an MT-Bench question, as `specdistill eval` decodes
them: `EvalRecipe._converse`): plain decoding (the baseline), fixed γ ∈ --gammas, and `eval.draft_length=confidence`
and `cumulative` (and `learned`, when the drafter has a stop head: drafter.stop_head=true) at each --thresholds value
with γ = max(--gammas) as the cap. Prompt by prompt, every setting decodes
in turn (the order rotated each prompt, after --warmup untimed prompts), so machine noise falls on all alike.
tokens/s = Σ new tokens ÷ Σ seconds (prefill included); speedup = ÷ plain's; τ = tokens committed per target forward;
drafted = tokens drafted per step (mean). Every setting's output must equal plain decoding token for token (the run
stops otherwise). The goal: a dynamic setting at or above the best fixed γ, which is chosen here after the fact.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from datetime import date

import torch

from side_by_side import argument_parser, eval_recipe, interleaved
from specdistill.distill.decoding import Decoder, DraftLength
from specdistill.eval.metrics import summarize


def settings(gammas: list[int], thresholds: list[float], learned: bool) -> dict[str, dict]:
    """Setting label → DecodingConfig changes (None: plain decoding)."""
    rows: dict[str, dict | None] = {"plain": None}
    rows.update({f"fixed γ={gamma}": {"gamma": gamma} for gamma in gammas})
    rules = [DraftLength.confidence, DraftLength.cumulative] + ([DraftLength.learned] if learned else [])
    for rule in rules:
        rows.update({f"{rule.value} ≥ {threshold} (γ ≤ {max(gammas)})":
                     {"gamma": max(gammas), "draft_length": rule, "draft_threshold": threshold}
                     for threshold in thresholds})
    return rows


def main() -> None:
    parser = argument_parser(__doc__, warmup=2)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    args = parser.parse_args()

    recipe = eval_recipe(args, ["eval.temperature=0", f"eval.gamma={max(args.gammas)}"])
    cfg = recipe.cfg
    proposer = recipe.drafters[str(args.drafter_path)]
    decoders = {label: Decoder(recipe.target, None if changes is None else proposer,
                               dataclasses.replace(recipe.decoding, **(changes or {})), recipe.eos)
                for label, changes in settings(args.gammas, args.thresholds, proposer.has_stop_head).items()}
    labels = list(decoders)

    def same_as_plain(index: int, conversations: dict[str, list]) -> None:
        plain_outputs = [turn.generation.output_ids for turn in conversations["plain"]]
        for label, conversation in conversations.items():
            if [turn.generation.output_ids for turn in conversation] != plain_outputs:
                sys.exit(f"{label}: output differs from plain decoding on prompt {recipe.prompts[index].id}")

    runs = interleaved(recipe, decoders, args.warmup, check=same_as_plain)

    categories = [prompt.category for prompt in recipe.prompts[args.warmup:]]
    plain = runs["plain"]
    rows = {label: summarize(runs[label], plain, categories, decoders[label].config.draft_depth)
            for label in labels[1:]}
    best_fixed = max((label for label in rows if label.startswith("fixed")), key=lambda label: rows[label]["speedup"])
    print(f"\n{cfg.target.name_or_path} · bench {cfg.bench.name} · {len(plain)} prompts · {args.max_new_tokens} new "
          f"tokens a turn · greedy · {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads · {date.today()}\n")
    print("| setting | τ | drafted/step | tokens/s | speedup vs plain | vs best fixed |")
    print("|---|---|---|---|---|---|")
    plain_speed = rows[best_fixed]["baseline_tokens_per_s"]
    print(f"| plain | 1.00 | 0 | {plain_speed:.1f} | 1.00× | — |")
    for label, row in rows.items():
        print(f"| {label} | {row['tau']:.2f} | {row['mean_draft_length']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{row['speedup']:.2f}× | {row['speedup'] / rows[best_fixed]['speedup']:.3f} |")
    print(f"\nbest fixed: {best_fixed}; every setting's output equals plain decoding's on every turn.")


if __name__ == "__main__":
    main()
