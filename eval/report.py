"""The eval report: `report.json`, `report.md` and PNG plots, from one report object (distill/reports.py: the run's
shared fields and one row per drafter).

A row's `accept_length_histogram` (index 0: steps that committed 1 token) and `per_category` (τ, α per position,
speedup and prompts of each category, in report.md's per-category table) feed the plots; its
`lossless_check_method` is shown under the table in report.md. Non-finite numbers are written as null (NaN is not
JSON). Every file is written under a temporary name and renamed when complete, so a file with its final name is
always whole; report.json is written last, so when it is there the whole report is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from specdistill.distill.outputs import json_text, replace_file, write_text_atomic
from specdistill.distill.reports import report_rows
TABLE_COLUMNS = (
    "drafter", "method", "τ", "speedup", "predicted speedup", "tokens/s", "baseline tokens/s", "c", "lossless check",
)
PLOTS = {
    "alpha_per_position.png": "Acceptance α per draft position",
    "per_category.png": "Speedup and τ per category",
    "accept_lengths.png": "Tokens committed per target forward",
}
# Every file an eval run writes into its out_dir (a new run moves an earlier run's into `previous/`).
REPORT_FILES = ("report.json", "report.md", "generations.jsonl", *PLOTS)


def write_report(out_dir: Path, report: dict) -> dict[str, Path]:
    """Write report.json (`report`, made by distill/reports.py's `report_document`), report.md and the plots into
    `out_dir`; returns {file name: path} of what was written."""
    results = report_rows(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # default=str: configs may hold enums or paths; the report must not fail at the very end of a long eval.
    report_json = json_text(report, indent=2, default=str) + "\n"  # non-finite numbers become null

    plots = {name: figure for name, figure in _figures(results).items() if figure is not None}
    written = {name: _write_png(out_dir / name, figure) for name, figure in plots.items()}
    for name, text in (("report.md", _markdown(results, list(plots))), ("report.json", report_json)):
        write_text_atomic(out_dir / name, text)
        written[name] = out_dir / name
    return written


def format_table(results: list[dict]) -> str:
    """The main markdown table: one line per report row (`report_rows`)."""
    rows = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for label, r in zip(_labels(results), results):
        cells = [
            label, r["method"], _num(r["tau"], ".2f"), _num(r["speedup"], ".2f", "×"),
            _num(r["predicted_speedup"], ".2f", "×"), _num(r["tokens_per_s"], ".1f"),
            _num(r["baseline_tokens_per_s"], ".1f"), _num(r["cost_ratio"], ".3f"), r["lossless_check"],
        ]
        rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(rows)


def _per_drafter_line(results: list[dict], title: str, key: str, spec: str, unit: str = "") -> list[str]:
    """["", "title: label value, label value."] over the rows that have `key`; [] when none has it."""
    values = [f"{label} {r[key]:{spec}}{unit}" for label, r in zip(_labels(results), results)
              if r.get(key) is not None]
    return ["", f"{title}: " + ", ".join(values) + "."] if values else []


def _markdown(results: list[dict], plot_names: list[str]) -> str:
    lines = [
        f"# Speculative decoding: {_joined(results, 'target')} on {_joined(results, 'bench')}",
        "",
        f"Temperature {_joined(results, 'temperature')}; {_joined(results, 'num_prompts')} prompts; "
        f"{_joined(results, 'new_tokens')} new tokens. τ: tokens committed per target forward; "
        "c: drafter step time ÷ target step time; predicted speedup: Leviathan et al.'s estimate from α and c.",
        "",
        format_table(results),
    ]
    # transformers' rows (no τ) may cover fewer prompts (eval.hf_baseline_prompts): the speedup is over those
    every = max(r["num_prompts"] for r in results)
    fewer = {r["num_prompts"] for r in results if r.get("tau") is None and r["num_prompts"] < every}
    subset = f" (on the {min(fewer)} of the {every} prompts it decoded)" if fewer else ""
    lines += _per_drafter_line(results, f"Speedup over transformers' plain greedy `generate`{subset}",
                               "speedup_over_transformers", ".2f", "×")
    lines += _per_drafter_line(results, "Tokens drafted per step (mean)", "mean_draft_length", ".2f")
    methods = {str(r["lossless_check_method"]) for r in results if r.get("lossless_check_method")}
    if methods:
        lines += ["", "Lossless check: " + "; ".join(sorted(methods)) + "."]
    category_rows = [
        f"| {label} | {category} | {stats.get('num_prompts', '—')} | {_num(stats.get('tau'), '.2f')} | "
        f"{_alphas(stats.get('alpha_per_position'))} | {_num(stats.get('speedup'), '.2f', '×')} |"
        for label, r in zip(_labels(results), results)
        for category, stats in sorted((r.get("per_category") or {}).items())
    ]
    if category_rows:  # Spec-Bench's per-task view: speedup and τ, with EAGLE's α per draft position beside them
        lines += ["", "## Per category", "", "| drafter | category | prompts | τ | α per position (α1 / α2 / …) | "
                  "speedup |", "|---|---|---|---|---|---|"]
        lines += category_rows
    lines += _selection_lines(results)
    lines += _adaptation_lines(results)
    positions = max(len(r["alpha_per_position"] or []) for r in results)
    if positions:
        lines += ["", "## Acceptance α per draft position", ""]
        lines.append("| drafter | " + " | ".join(f"α{k + 1}" for k in range(positions)) + " |")
        lines.append("|---" * (positions + 1) + "|")
        for label, r in zip(_labels(results), results):
            alphas = list(r["alpha_per_position"] or []) + [None] * positions
            lines.append(f"| {label} | " + " | ".join(_num(a, ".3f") for a in alphas[:positions]) + " |")
    if plot_names:
        lines += ["", "## Plots"] + [f"\n![{PLOTS[name]}]({name})" for name in plot_names]
    return "\n".join(lines) + "\n"


def _adaptation_lines(results: list[dict]) -> list[str]:
    """eval.adaptation=online: τ of the adapted drafter against the frozen one, on the stream and held out."""
    lines = []
    for r in results:
        adaptation = r.get("adaptation")
        if not adaptation:
            continue
        lines += ["", "## Online drafter adaptation (OnlineSpec / OSD)", "",
                  f"lr {adaptation['lr']:g}, {adaptation['steps_per_update']} step(s) per decoded turn, "
                  f"{adaptation['updates']} updates ({adaptation['update_seconds']:.1f} s of training, not in "
                  f"tokens/s); saved in {adaptation['saved_to']}/.", "",
                  "| prompts | frozen τ | adapted τ |", "|---|---|---|",
                  f"| stream ({adaptation['stream_prompts']}, learned from) | "
                  f"{_num(adaptation['frozen_tau_stream'], '.3f')} | {_num(adaptation['tau_stream'], '.3f')} |",
                  f"| held out ({adaptation['held_out_prompts']}, adapted weights frozen) | "
                  f"{_num(adaptation['frozen_tau_held_out'], '.3f')} | {_num(adaptation['tau_held_out'], '.3f')} |"]
    return lines


def _selection_lines(results: list[dict]) -> list[str]:
    """eval.selection=hedge: who drafted how often, and the regret against the best fixed drafter per category."""
    lines = []
    for r in results:
        selection = r.get("selection")
        if not selection:
            continue
        lines += ["", "## Online drafter selection (HedgeSpec)", "",
                  "| drafter | share of steps drafted | first-position acceptance |", "|---|---|---|"]
        lines += [f"| {name} | {_num(stats['lead_fraction'], '.1%')} | {_num(stats['first_position_acceptance'], '.3f')} |"
                  for name, stats in selection["members"].items()]
        lines += ["", "| category | best fixed drafter | its τ | hedge τ | regret |", "|---|---|---|---|---|"]
        lines += [f"| {category} | {stats['oracle']} | {_num(stats['oracle_tau'], '.3f')} | {_num(stats['tau'], '.3f')} "
                  f"| {_num(stats['regret'], '.1%')} |" for category, stats in sorted(selection["regret_per_category"].items())]
        lines += ["", f"Against the best fixed drafter overall ({selection['best_fixed']}): regret "
                  f"{_num(selection['regret_overall'], '.1%')} in τ."]
    return lines


def _figures(results: list[dict]) -> dict[str, Figure | None]:
    labels = _labels(results)
    return {
        "alpha_per_position.png": _alpha_figure(labels, results),
        "per_category.png": _category_figure(labels, results),
        "accept_lengths.png": _accept_length_figure(labels, results),
    }


def _new_figure(width: float = 6.4, height: float = 4.0, columns: int = 1) -> tuple[Figure, list]:
    # A bare Figure on an Agg canvas: no pyplot global state, no GUI backend, safe on headless machines.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _alpha_figure(labels: list[str], results: list[dict]) -> Figure | None:
    if not any(r["alpha_per_position"] for r in results):
        return None
    figure, (axes,) = _new_figure()
    for label, r in zip(labels, results):
        alphas = [_float(a) for a in r["alpha_per_position"] or []]
        axes.plot(range(1, len(alphas) + 1), alphas, marker="o", label=label)
    axes.set(xlabel="draft position k", ylabel="α_k", ylim=(0, 1.02), title=PLOTS["alpha_per_position.png"])
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def _category_figure(labels: list[str], results: list[dict]) -> Figure | None:
    categories = sorted({c for r in results for c in (r.get("per_category") or {})})
    if not categories:
        return None
    figure, axes_pair = _new_figure(width=max(8.0, 2.0 + 1.5 * len(categories)), columns=2)
    width = 0.8 / len(results)
    for axes, metric, name in zip(axes_pair, ("speedup", "tau"), ("speedup", "τ")):
        for i, (label, r) in enumerate(zip(labels, results)):
            stats = r.get("per_category") or {}
            values = [_float(stats.get(c, {}).get(metric)) for c in categories]
            offset = (i - (len(results) - 1) / 2) * width  # bars of one category side by side, centred on it
            axes.bar([x + offset for x in range(len(categories))], values, width, label=label)
        axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        axes.set(ylabel=name, title=f"{name} per category")
        axes.axhline(1.0, color="grey", linewidth=0.8)  # 1 = plain autoregressive decoding
        axes.grid(axis="y", alpha=0.3)
    figure.legend(*axes_pair[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(results))
    return figure


def _accept_length_figure(labels: list[str], results: list[dict]) -> Figure | None:
    histograms = [list(r.get("accept_length_histogram") or []) for r in results]
    if not any(sum(h) for h in histograms):
        return None
    figure, (axes,) = _new_figure()
    lengths = max(len(h) for h in histograms)
    width = 0.8 / len(results)
    for i, (label, counts) in enumerate(zip(labels, histograms)):
        # Shares of steps, not counts, so drafters evaluated on different token budgets compare directly.
        total = sum(counts) or 1
        shares = [c / total for c in counts] + [0.0] * (lengths - len(counts))
        offset = (i - (len(results) - 1) / 2) * width
        axes.bar([k + 1 + offset for k in range(lengths)], shares, width, label=label)
    axes.set(xlabel="tokens committed in one target forward", ylabel="share of decoding steps")
    axes.set_title(PLOTS["accept_lengths.png"])
    axes.set_xticks(range(1, lengths + 1))
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    return figure


def _write_png(path: Path, figure: Figure) -> Path:
    """Save `figure` under a temporary name, then rename it into place."""
    with replace_file(path) as partial:
        figure.savefig(partial, format="png", dpi=120)
    return path


def _labels(results: list[dict]) -> list[str]:
    """Drafter names, with method and temperature added when a name appears more than once."""
    names = [str(r["drafter"]) for r in results]
    if len(set(names)) == len(names):
        return names
    return [f"{r['drafter']} ({r['method']}, T={r['temperature']})" for r in results]


def _joined(results: list[dict], key: str) -> str:
    return ", ".join(dict.fromkeys(str(r[key]) for r in results))


def _float(value: Any) -> float:
    """A plottable number: None and ±inf become NaN (no bar, no point) instead of stretching the axes."""
    return math.nan if value is None or not math.isfinite(value) else float(value)


def _alphas(values: list | None) -> str:
    """α per draft position in one cell: "0.81 / 0.62 / 0.40" (— where not reached or not recorded)."""
    return " / ".join(_num(a, ".2f") for a in values) if values else "—"


def _num(value: Any, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:{spec}}{unit}"


