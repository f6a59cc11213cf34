"""Decoding speed: our decoder (distill/decoding.py) beside transformers' own speculative decoding, on one target.

    python benchmarks/eval_speed.py --num-prompts 20                      # toy target, CPU (or the GPU if present)
    python benchmarks/eval_speed.py --num-prompts 20 --drafter-path /tmp/q/eagle1/drafter   # + an EAGLE head
    python benchmarks/eval_speed.py --shape llama8b --num-prompts 20      # Llama-3-8B shape, random bf16, GPU only
    python benchmarks/eval_speed.py --shape llama8b --tokenizer toy_tiny  # … prompts rendered with toy_tiny's tokenizer
    python benchmarks/eval_speed.py --num-prompts 3 --max-new-tokens 32   # a smoke run

Methods, all greedy, on the same target and prompts (the toy bench, chat template, EOS `<|end|>`):

    ours plain        Decoder(target, None): plain autoregressive decoding, our KV cache (the speedup baseline)
    ours LM γ         our speculative decoding, chain of γ drafts from a token-level drafter LM (LMDrafting)
    ours EAGLE γ      … from the `specdistill train` drafter at --drafter-path (chain, γ), when given
    HF plain          transformers `generate`
    HF assisted γ     transformers assisted generation, the same drafter LM as assistant, γ drafts a round
    HF prompt lookup  transformers prompt-lookup decoding, γ tokens a round

The drafter LM: `toy` uses a 2-layer toy model (hidden 64) trained on the same corpus with the same tokenizer
settings as the target (the script checks the two tokenizers are the same and stops if not); `llama8b` uses the
target's embeddings, first 2 layers, final norm and LM head (random weights: timing only, no quality meaning).

Everything runs in one process, prompt by prompt (the methods interleaved, their order rotated each prompt), after
2 untimed warm-up prompts; timers are synchronised on CUDA; on CPU torch runs 1 thread unless --threads says
otherwise. tokens/s is Σ generated tokens ÷ Σ wall seconds (prefill included); speedup is a method's tokens/s ÷ ours
plain tokens/s; τ = tokens committed per target forward (decoding steps only). For our speculative methods:
α = Σ accepted ÷ Σ reached over all draft positions, c = mean drafter-call seconds ÷ ours plain seconds per target
call, predicted speedup (Leviathan et al.) S = τ_pred / (γ·c + 1) with τ_pred = (1 − α^{γ+1}) / (1 − α). Every
method's output must equal ours plain token for token: a mismatch of ours stops the run (in bf16 it is only reported:
a batched verify can flip a near-tie), transformers' are counted.

Tracked ratios (goals): ours LM tokens/s ÷ HF assisted tokens/s ≥ 1.5; ours EAGLE speedup ≥ 1.3; ours EAGLE
measured ÷ predicted speedup ≥ 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specdistill.distill.config import CACHE_ENV, DEFAULT_CACHE_DIR
from specdistill.distill.targets import tokenizer_fingerprint
from specdistill.distill.toy import END_OF_TURN, ToyTargetConfig, ensure_toy_target
from specdistill.distill.target import FrozenTarget
from specdistill.eval.baselines import hf_generate
from specdistill.eval.benches import BenchConfig, load_bench, render_prompt
from specdistill.distill.decoding import Decoder, DecodingConfig, Generation
from specdistill.eval.metrics import predicted_speedup, predicted_tau
from specdistill.distill.drafters import load_drafting
from specdistill.distill.drafters.token_lm import LMDrafting

WARMUP_PROMPTS = 2
TOY_DRAFTER = ToyTargetConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)
LLAMA8B = dict(  # Llama-3-8B's shape
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
)
LLAMA8B_DRAFTER_LAYERS = 2


@dataclass
class Totals:
    """One method's sums over the timed prompts."""

    tokens: int = 0
    seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    # ours speculative only
    steps: int = 0
    committed: int = 0
    reached: int = 0
    accepted: int = 0
    target_calls: int = 0
    drafter_calls: int = 0  # timed ones (the drafter's prefill is not in draft_seconds)
    draft_seconds: float = 0.0

    def add_generation(self, generation: Generation) -> None:
        self.tokens += len(generation.output_ids)
        self.seconds += generation.seconds
        self.steps += len(generation.accept_lengths)
        self.committed += sum(generation.accept_lengths)
        self.reached += sum(generation.reached)
        self.accepted += sum(generation.accepted)
        self.target_calls += generation.target_calls
        self.drafter_calls += max(generation.drafter_calls - 1, 0)
        self.draft_seconds += generation.draft_seconds


# -- models ----------------------------------------------------------------------------------------------------


def toy_models(cache_dir: Path, device: torch.device):
    """The default toy target, the 2-layer toy drafter LM, the shared tokenizer; stops if the tokenizers differ."""
    target_path = ensure_toy_target(ToyTargetConfig(), cache_dir)
    drafter_path = ensure_toy_target(TOY_DRAFTER, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    drafter_tokenizer = AutoTokenizer.from_pretrained(drafter_path)
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(drafter_tokenizer):
        sys.exit(
            f"the drafter LM's tokenizer ({drafter_path}) differs from the target's ({target_path}): "
            f"fingerprints {tokenizer_fingerprint(drafter_tokenizer)} ≠ {tokenizer_fingerprint(tokenizer)}; a "
            "token-level drafter must share the target's tokenizer (did ToyTargetConfig's tokenizer settings change?)"
        )
    target = LlamaForCausalLM.from_pretrained(target_path, dtype=torch.float32).to(device).eval()
    drafter = LlamaForCausalLM.from_pretrained(drafter_path, dtype=torch.float32).to(device).eval()
    return target, drafter, tokenizer, f"toy target {target_path.name}, drafter LM {drafter_path.name}"


def prompt_tokenizer_folder(name_or_path: str | None, cache_dir: Path) -> Path:
    """--shape llama8b: the folder of the tokenizer that renders the toy-bench prompts: a folder given, or a toy
    target preset of conf/target (toy, toy_tiny) built on first use; default the toy target's."""
    if name_or_path is None:
        return ensure_toy_target(ToyTargetConfig(), cache_dir)
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    from hydra import compose, initialize_config_dir

    from specdistill.data_prep.config import register_configs
    from specdistill.distill.config import CONFIG_DIR
    from specdistill.distill.targets import resolve_target_path

    if not (Path(CONFIG_DIR) / "target" / f"{name_or_path}.yaml").is_file():
        sys.exit(f"--tokenizer {name_or_path}: neither a folder nor a target preset in {CONFIG_DIR}/target")
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prep", overrides=[f"target={name_or_path}", "out_dir=unused"])
    return Path(resolve_target_path(cfg.target, str(cache_dir)))


def llama8b_models(device: torch.device, shape: dict = LLAMA8B, drafter_layers: int = LLAMA8B_DRAFTER_LAYERS):
    """A random-weight bf16 target of Llama-3-8B's shape and a drafter made of its first `drafter_layers` layers
    (sharing its embeddings, final norm and LM head)."""
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            target = LlamaForCausalLM(config)
        drafter_config = LlamaConfig(**{**shape, "num_hidden_layers": drafter_layers}, tie_word_embeddings=False,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
        with torch.device("meta"):
            drafter = LlamaForCausalLM(drafter_config)
    finally:
        torch.set_default_dtype(default_dtype)
    drafter.model.embed_tokens = target.model.embed_tokens
    drafter.model.layers = torch.nn.ModuleList(target.model.layers[:drafter_layers])
    drafter.model.norm = target.model.norm
    drafter.lm_head = target.lm_head
    drafter.model.rotary_emb = target.model.rotary_emb  # same rope settings; holds only inv_freq
    for model in (target, drafter):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        model.eval().requires_grad_(False)
    if any(tensor.device.type == "meta" for tensor in [*drafter.parameters(), *drafter.buffers()]):
        raise RuntimeError("llama8b drafter: a parameter was left on the meta device")
    return target, drafter


# -- the run ---------------------------------------------------------------------------------------------------


def first_difference(tokens: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))


def predicted(totals: Totals, plain: Totals, gamma: int) -> dict:
    """α, c, τ_pred and S_pred of one of our speculative methods (DESIGN.md, Definitions)."""
    alpha = totals.accepted / max(totals.reached, 1)
    cost = (totals.draft_seconds / max(totals.drafter_calls, 1)) / (plain.seconds / plain.target_calls)
    return {"alpha": alpha, "c": cost, "tau_pred": predicted_tau(alpha, gamma),
            "speedup_pred": predicted_speedup(alpha, gamma, cost)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "llama8b"], default="toy")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--drafter-path", help="an EAGLE drafter folder written by `specdistill train` (…/drafter)")
    parser.add_argument("--cache-dir", default=os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (default 1; 0 keeps torch's default). Decoding a toy model is one "
                             "tiny matmul chain per token: with 2 threads on a 2-core machine that is busy elsewhere "
                             "a forward was measured 17x slower than with 1 (OpenMP threads waiting on each other)")
    parser.add_argument("--tokenizer", help="--shape llama8b: the tokenizer that renders the toy-bench prompts, a folder "
                                            "or a toy target preset (toy_tiny builds in seconds; default: toy's)")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args()
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.gamma < 1:
        parser.error("--num-prompts, --max-new-tokens and --gamma must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache_dir = Path(args.cache_dir).expanduser()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    # the toy target's tokenizer and bench prompts serve both shapes (their ids are valid in Llama's vocabulary)
    if args.shape == "llama8b":
        if device.type != "cuda":
            sys.exit("--shape llama8b needs a CUDA GPU (a random-weight Llama-3-8B-shaped target in bf16, about "
                     "16 GB); none is available here. Use --shape toy on CPU.")
        tokenizer = AutoTokenizer.from_pretrained(prompt_tokenizer_folder(args.tokenizer, cache_dir))
        model, drafter_model = llama8b_models(device)
        models_note = f"random Llama-3-8B shape bf16, drafter = its first {LLAMA8B_DRAFTER_LAYERS} layers"
    else:
        model, drafter_model, tokenizer, models_note = toy_models(cache_dir, device)
    exact = model.dtype == torch.float32  # bf16: a batched verify may flip a near-tie of plain decoding
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)}
    prompts = [render_prompt(tokenizer, prompt, chat_template=True)
               for prompt in load_bench(BenchConfig(name="toy"), args.num_prompts)]

    target = FrozenTarget(model)
    plain_config = DecodingConfig(max_new_tokens=args.max_new_tokens)
    chain_config = DecodingConfig(method="chain", gamma=args.gamma, max_new_tokens=args.max_new_tokens)
    ours: dict[str, Decoder] = {"ours plain": Decoder(target, None, plain_config, eos)}
    lm_name, eagle_name = f"ours LM γ={args.gamma}", f"ours EAGLE γ={args.gamma}"
    ours[lm_name] = Decoder(target, LMDrafting(drafter_model, device), chain_config, eos)
    if args.drafter_path:
        proposer = load_drafting(args.drafter_path, target, device)
        ours[eagle_name] = Decoder(target, proposer, chain_config, eos)
    hf_name = f"HF assisted γ={args.gamma}"
    theirs = {
        "HF plain": {},
        hf_name: {"assistant_model": drafter_model, "num_assistant_tokens": args.gamma},
        f"HF prompt lookup γ={args.gamma}": {"prompt_lookup_num_tokens": args.gamma},
    }
    names = list(ours) + list(theirs)

    def run(name: str, prompt: list[int]) -> tuple[list[int], Generation | None, float]:
        if name in ours:
            generation = ours[name].generate(prompt)
            return generation.output_ids, generation, generation.seconds
        tokens, seconds = hf_generate(model, prompt, args.max_new_tokens, eos, **theirs[name])
        return tokens, None, seconds

    print(f"{args.shape} on {device} ({models_note}); {len(prompts)} prompts + {WARMUP_PROMPTS} warm-up, "
          f"max_new_tokens {args.max_new_tokens}, γ {args.gamma}", flush=True)
    for prompt in prompts[:WARMUP_PROMPTS]:
        for name in names:
            run(name, prompt)

    totals = {name: Totals() for name in names}
    for index, prompt in enumerate(prompts):
        rotated = names[index % len(names):] + names[: index % len(names)]  # no method always runs first
        outputs = {}
        for name in rotated:
            outputs[name], generation, seconds = run(name, prompt)
            if generation is not None:
                totals[name].add_generation(generation)
            else:
                totals[name].tokens += len(outputs[name])
                totals[name].seconds += seconds
        expected = outputs["ours plain"]
        for name in names[1:]:
            if outputs[name] != expected:
                at = first_difference(outputs[name], expected)
                note = (f"prompt {index}: {name} differs from ours plain at token {at} "
                        f"({outputs[name][at:at + 3]} vs {expected[at:at + 3]}; lengths {len(outputs[name])}, "
                        f"{len(expected)})")
                totals[name].mismatches.append(note)
                print("MISMATCH " + note, flush=True)
        print(f"prompt {index + 1}/{len(prompts)}: {len(prompt)} prompt tokens, {len(expected)} generated", flush=True)

    # -- report ------------------------------------------------------------------------------------------------
    plain = totals["ours plain"]
    plain_rate = plain.tokens / plain.seconds
    results = {}
    for name in names:
        t = totals[name]
        rate = t.tokens / t.seconds
        row = {"tokens": t.tokens, "seconds": round(t.seconds, 4), "tokens_per_s": rate,
               "speedup": rate / plain_rate, "tau": None, "mismatches": len(t.mismatches)}
        if name in ours and name != "ours plain":
            row["tau"] = t.committed / max(t.steps, 1)
            row.update(predicted(t, plain, args.gamma))
            row["measured_over_predicted"] = row["speedup"] / row["speedup_pred"]
        results[name] = row
    ratios = {"ours_lm_over_hf_assisted": {"value": results[lm_name]["tokens_per_s"] / results[hf_name]["tokens_per_s"],
                                           "goal": 1.5}}
    if eagle_name in results:
        ratios["ours_eagle_speedup"] = {"value": results[eagle_name]["speedup"], "goal": 1.3}
        ratios["ours_eagle_measured_over_predicted"] = {"value": results[eagle_name]["measured_over_predicted"],
                                                       "goal": 0.9}

    def fmt(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    print()
    print("| method | tokens/s | speedup vs ours plain | τ | α | c | predicted speedup | mismatches |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results.items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}× | {fmt(row['tau'])} | "
              f"{fmt(row.get('alpha'), 3)} | {fmt(row.get('c'), 3)} | "
              f"{fmt(row.get('speedup_pred'))}{'×' if 'speedup_pred' in row else ''} | {row['mismatches']} |")
    print()
    labels = {"ours_lm_over_hf_assisted": f"{lm_name} tokens/s ÷ {hf_name} tokens/s",
              "ours_eagle_speedup": f"{eagle_name} speedup over ours plain",
              "ours_eagle_measured_over_predicted": f"{eagle_name} measured ÷ predicted speedup"}
    for key, ratio in ratios.items():
        status = "met" if ratio["value"] >= ratio["goal"] else "NOT met"
        print(f"{labels[key]}: {ratio['value']:.2f} (goal ≥ {ratio['goal']}: {status})")
    if not args.drafter_path:
        print("(no --drafter-path: the EAGLE ratios are not measured)")
    threads = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    machine = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {threads}"
    print(f"machine: {machine}; date {date.today().isoformat()}")

    if args.out:
        report = {"shape": args.shape, "device": str(device), "models": models_note, "args": vars(args),
                  "num_prompts": len(prompts), "warmup_prompts": WARMUP_PROMPTS, "methods": results,
                  "ratios": ratios, "mismatch_details": {n: t.mismatches for n, t in totals.items() if t.mismatches},
                  "machine": machine, "date": date.today().isoformat()}
        Path(args.out).expanduser().write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")

    ours_mismatches = [note for name in ours for note in totals[name].mismatches]
    if ours_mismatches:
        message = f"{len(ours_mismatches)} of our speculative outputs differ from our plain decoding (not lossless)"
        if exact:
            sys.exit("FAILED: " + message)
        print(f"WARNING: {message}; the target runs in {model.dtype}, where batched verification can flip near-ties")


if __name__ == "__main__":
    main()
