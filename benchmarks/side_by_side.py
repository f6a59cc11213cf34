"""What the side-by-side decoding benchmarks share (draft_length.py, tree_candidates.py): the `specdistill eval` recipe
they decode with, and the interleaved loop that runs every setting on each prompt in turn, so machine noise falls on
all alike."""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Callable

import torch
from hydra import compose, initialize_config_dir

from specdistill.data_prep.config import register_configs
from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.decoding import Decoder, Generation
from specdistill.eval.eval import EvalRecipe
from specdistill.eval.metrics import combine_turns


def argument_parser(description: str, warmup: int) -> argparse.ArgumentParser:
    """The arguments every side-by-side benchmark takes: the drafter, eval overrides, prompts, tokens, warm-up."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter-path", required=True)
    parser.add_argument("--override", nargs="*", default=[], help="eval config overrides (target=…, bench=…)")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=warmup, help="prompts decoded untimed first")
    return parser


def eval_recipe(args: argparse.Namespace, overrides: list[str]) -> EvalRecipe:
    """`specdistill eval` with `argument_parser`'s arguments and `overrides`, set up (target, drafter, prompts loaded),
    without running; its prompts are the --warmup ones followed by --num-prompts measured ones."""
    register_configs()
    with tempfile.TemporaryDirectory() as out_dir, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            *args.override, f"eval.num_prompts={args.num_prompts + args.warmup}",
            f"eval.max_new_tokens={args.max_new_tokens}", *overrides, f"drafter_path={args.drafter_path}",
            f"out_dir={out_dir}"])
        recipe = EvalRecipe(cfg)
        recipe.setup()
    return recipe


def interleaved(recipe: EvalRecipe, decoders: dict[str, Decoder], warmup: int, samples: int = 1,
                check: Callable[[int, dict[str, list]], None] | None = None) -> dict[str, list[Generation]]:
    """Each prompt (every turn, as eval decodes it) with every decoder, the order rotated per prompt, `samples` times
    each (seeded by prompt and sample, the same seeds for every decoder); `check(index, conversations)` sees each
    prompt's conversations. → label: one combined Generation per prompt and sample after the first `warmup` prompts."""
    labels = list(decoders)
    runs: dict[str, list[Generation]] = {label: [] for label in labels}
    for index in range(len(recipe.prompts)):
        for sample in range(samples):
            order = labels[index % len(labels):] + labels[: index % len(labels)]
            conversations = {}
            for label in order:
                generator = torch.Generator(device=recipe.device).manual_seed(1000 * index + sample)
                conversations[label] = recipe._converse(
                    index, lambda ids, decoder=decoders[label], generator=generator: decoder.generate(ids, generator))
            if check is not None:
                check(index, conversations)
            if index >= warmup:
                for label, conversation in conversations.items():
                    runs[label].append(combine_turns([turn.generation for turn in conversation]))
        print(f"prompt {index + 1}/{len(recipe.prompts)} done", file=sys.stderr)
    return runs
