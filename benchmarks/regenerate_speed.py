"""Regeneration speed (`prep data.regenerate=true`): our batched decode loop beside transformers' `generate`.

    python benchmarks/regenerate_speed.py --target /tmp/smollm2_hf --prompts 16 --new-tokens 128 --batch 1 8 16
    python benchmarks/regenerate_speed.py --target /tmp/smollm2_hf --dtype bf16 --batch 8
    python benchmarks/regenerate_speed.py --target <toy folder> --prompts 4 --new-tokens 16 --batch 2   # a smoke run

The prompts are the first --prompts Alpaca records of --data (default: the `data=alpaca` file `specdistill setup`
places), rendered with the target's chat template and sorted by length, as prep does. For each batch size B, both
methods decode all prompts greedily in batches of B, up to --new-tokens each, with the same EOS ids:

    ours   data_prep/regenerate.py's BatchedGenerator on the lean forward; a row leaves the batch at its EOS
    HF     transformers `generate` on the left-padded batch (the regeneration path before ours)

tokens/s = Σ reply tokens (through each reply's EOS) ÷ Σ wall seconds, prefill included, after an untimed warm-up
batch each; the methods alternate batch by batch, so other work on the machine slows both alike. Greedy replies
are compared reply by reply (a near-tie may flip with another batch shape or in bf16). The last column is the
machine's 1-minute load average after the method's last batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdistill.data_prep.readers import parse_record
from specdistill.data_prep.regenerate import BatchedGenerator, generate_with_transformers
from specdistill.data_prep.chat import render
from specdistill.distill.config import CACHE_ENV, DEFAULT_CACHE_DIR
from specdistill.distill.lean import lean_causal_lm
from specdistill.distill.targets import eos_token_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("ours", "HF")
DEFAULT_DATA = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)).expanduser() / "real_bed/alpaca/alpaca_en_demo.json"


def alpaca_prompts(path: Path, count: int, tokenizer: Any) -> list[list[int]]:
    records = json.loads(path.read_text(encoding="utf-8"))[:count]
    prompts = [render(tokenizer, parse_record(record, "alpaca").messages[:1], add_generation_prompt=True)
               for record in records]
    return sorted((tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts), key=len)


def through_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """A reply's tokens up to and including its first EOS (`generate` pads finished rows after it)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


Method = Callable[[list[list[int]]], list[list[int]]]


def timed(methods: dict[str, Method], prompts: list[list[int]], batch: int,
          eos_ids: set[int]) -> dict[str, tuple[float, list[list[int]]]]:
    """Each method over all prompts in batches of `batch`, the methods alternating batch by batch (the order rotated
    each batch, so other work on the machine slows them alike) → name: (seconds, replies)."""
    for method in methods.values():
        method(prompts[:batch])  # warm-up: oneDNN's first calls and the allocator
    seconds = dict.fromkeys(methods, 0.0)
    replies: dict[str, list[list[int]]] = {name: [] for name in methods}
    names = list(methods)
    for turn, start in enumerate(range(0, len(prompts), batch)):
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            started = time.perf_counter()
            new_tokens = methods[name](prompts[start : start + batch])
            seconds[name] += time.perf_counter() - started
            replies[name] += [through_eos(reply, eos_ids) for reply in new_tokens]
    return {name: (seconds[name], replies[name]) for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="a local Llama-family model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an Alpaca-style .json list")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=DTYPES[args.dtype]).eval()
    eos_ids = eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = alpaca_prompts(args.data, args.prompts, tokenizer)
    lean = lean_causal_lm(model)
    if lean is None:
        raise SystemExit(f"{args.target}: the lean forward does not support this model; nothing to compare")
    print(f"# {date.today()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.target} ({args.dtype}); {len(prompts)} Alpaca prompts of "
          f"{min(map(len, prompts))}–{max(map(len, prompts))} tokens, greedy, up to {args.new_tokens} new tokens")
    print(f"{'batch':>5} {'method':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'same as ours':>13} {'load':>5}")
    for batch in args.batch:
        regen_cfg = SimpleNamespace(temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens, batch_size=batch)
        generator = BatchedGenerator(lean, eos_ids, pad_id, regen_cfg, model.device)
        methods = {
            "ours": lambda chunk: [reply for _, reply in sorted(generator.generate(chunk, seeds=[0] * len(chunk)))],
            "HF": lambda chunk: generate_with_transformers(model, chunk, pad_id, regen_cfg, seed=0),
        }
        results = timed({name: methods[name] for name in args.methods}, prompts, batch, eos_ids)
        for name, (seconds, replies) in results.items():
            same = (f"{sum(a == b for a, b in zip(replies, results['ours'][1]))}/{len(replies)}"
                    if "ours" in results and name != "ours" else "")
            tokens = sum(map(len, replies))
            print(f"{batch:>5} {name:>6} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>9.1f} {same:>13} "
                  f"{os.getloadavg()[0]:>5.1f}", flush=True)

if __name__ == "__main__":
    main()
