"""Metrics of a run, exactly as DESIGN.md defines them.

    τ      = Σ tokens committed by decoding steps ÷ number of decoding steps (micro-averaged; plain decoding: 1).
             The prefill's first token is not a decoding step for either method.
    α_k    = accepted at draft position k ÷ times position k was reached
    speedup = (new tokens ÷ seconds) speculative ÷ the same for plain decoding, same prompts and cache code
    c      = one drafter call's mean time ÷ one plain target step's mean time
    predicted (Leviathan et al.): α = Σ accepted ÷ Σ reached over all positions, τ̂ = (1 − α^{γ+1}) / (1 − α),
             Ŝ = τ̂ / (n·c + 1), with γ the drafting depth (chain: gamma, the cap of a dynamic draft length;
             tree: tree_depth) and n the drafter calls of a round: γ, or 1 for a parallel drafter (P-EAGLE), whose c
             is then the cost of a whole round
    round_ms = per decoding step: drafting time (the drafter's catch-up on the accepted tokens included) and the rest
             of the wall time (the target's verify, acceptance, commit; the prefill spread over the steps), in ms
    drafted = tokens drafted and verified per decoding step (mean_draft_length, draft_length_histogram: index n
             counts the steps that drafted n); a fixed chain drafts gamma every step

A prompt of several turns (MT-Bench) counts as one prompt whose decoding is all its turns' (`combine_turns`): their
decoding steps, accepted drafts, new tokens and wall times are summed, per run and per category.
"""

from __future__ import annotations

from collections import defaultdict

from specdistill.distill.decoding import Generation


def _sum(values) -> float:
    return float(sum(values))


def _histogram(values: list[int], smallest: int) -> list[int]:
    """Counts of smallest, smallest + 1, … up to the largest value (one zero bin when there are no values)."""
    counts = [0] * (max(values, default=smallest) - smallest + 1)
    for value in values:
        counts[value - smallest] += 1
    return counts


def tokens_per_second(generations: list[Generation]) -> float:
    return _sum(len(g.output_ids) for g in generations) / max(_sum(g.seconds for g in generations), 1e-12)


def combine_turns(turns: list[Generation]) -> Generation:
    """One prompt's turns as one Generation: new tokens and decoding steps in turn order, per-position counts, times
    and calls summed (each turn's prefill is timed, as it is for plain and speculative decoding alike)."""
    return Generation(
        output_ids=[token for turn in turns for token in turn.output_ids],
        accept_lengths=[length for turn in turns for length in turn.accept_lengths],
        reached=[sum(counts) for counts in zip(*(turn.reached for turn in turns))],
        accepted=[sum(counts) for counts in zip(*(turn.accepted for turn in turns))],
        draft_lengths=[length for turn in turns for length in turn.draft_lengths],
        seconds=_sum(turn.seconds for turn in turns),
        draft_seconds=_sum(turn.draft_seconds for turn in turns),
        verify_seconds=_sum(turn.verify_seconds for turn in turns),
        drafter_calls=sum(turn.drafter_calls for turn in turns),
        target_calls=sum(turn.target_calls for turn in turns),
    )


def alpha_per_position(generations: list[Generation]) -> list[float | None]:
    """α_k = accepted at position k ÷ times position k was reached (None where never reached)."""
    reached = [sum(values) for values in zip(*(g.reached for g in generations))]
    accepted = [sum(values) for values in zip(*(g.accepted for g in generations))]
    return [a / r if r else None for a, r in zip(accepted, reached)]


def predicted_tau(alpha: float, depth: int) -> float:
    return depth + 1.0 if alpha >= 1.0 else (1 - alpha ** (depth + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, depth: int, cost_ratio: float, calls_per_round: int | None = None) -> float:
    """Ŝ (module doc); `calls_per_round` defaults to `depth` (one drafter call per drafted position)."""
    calls = depth if calls_per_round is None else calls_per_round
    return predicted_tau(alpha, depth) / (calls * cost_ratio + 1)


def summarize(
    generations: list[Generation], plain: list[Generation], categories: list[str], depth: int, parallel: bool = False
) -> dict:
    """The measured numbers of one drafter against the plain baseline on the same prompts (report.json keys);
    `parallel`: the drafter drafts a round in one call."""
    steps = [length for g in generations for length in g.accept_lengths]
    reached = [sum(values) for values in zip(*(g.reached for g in generations))]
    accepted = [sum(values) for values in zip(*(g.accepted for g in generations))]
    plain_step = _sum(g.seconds for g in plain) / max(_sum(g.target_calls for g in plain), 1)
    drafter_call = _sum(g.draft_seconds for g in generations) / max(_sum(g.drafter_calls for g in generations), 1)
    cost_ratio = drafter_call / plain_step
    alpha = _sum(accepted) / max(_sum(reached), 1)
    speed, baseline_speed = tokens_per_second(generations), tokens_per_second(plain)
    draft_lengths = [length for g in generations for length in g.draft_lengths]
    per_category = {}
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(categories):
        by_category[category].append(index)
    for category, indices in by_category.items():
        mine, theirs = [generations[i] for i in indices], [plain[i] for i in indices]
        category_steps = [length for g in mine for length in g.accept_lengths]
        per_category[category] = {
            "tau": _sum(category_steps) / max(len(category_steps), 1),
            "alpha_per_position": alpha_per_position(mine),
            "speedup": tokens_per_second(mine) / tokens_per_second(theirs),
            "num_prompts": len(indices),
        }
    return {
        "tau": _sum(steps) / max(len(steps), 1),
        "alpha_per_position": alpha_per_position(generations),
        "speedup": speed / baseline_speed,
        "predicted_speedup": predicted_speedup(alpha, depth, cost_ratio, 1 if parallel else depth),
        "tokens_per_s": speed,
        "baseline_tokens_per_s": baseline_speed,
        "cost_ratio": cost_ratio,
        "num_prompts": len(generations),
        "new_tokens": int(_sum(len(g.output_ids) for g in generations)),
        "accept_length_histogram": _histogram(steps, smallest=1),  # index 0: steps that committed 1 token
        "round_ms": {"draft": 1000 * _sum(g.draft_seconds for g in generations) / max(len(steps), 1),
                     "verify": 1000 * _sum(g.verify_seconds for g in generations) / max(len(steps), 1)},
        "mean_draft_length": _sum(draft_lengths) / max(len(draft_lengths), 1),
        "draft_length_histogram": _histogram(draft_lengths, smallest=0),  # index n: steps that drafted n tokens
        "per_category": per_category,
    }
