"""Where a training step's time goes, from a prepared dataset (and its feature cache): `specdistill train`'s own
recipe is set up with the given overrides, then steps are timed with the torch profiler; the table groups the
operators (matmuls, softmax, the cache read, the optimizer).

    python benchmarks/train_step_profile.py data_dir=/tmp/prep/dataset target=smollm2_135m_instruct drafter=eagle3 \
        features.source=cache train.batch_size=4 train.max_length=512 [--steps 4]

Every argument but --steps is a `specdistill train` override; the first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="also print the torch profiler's operator table")
    args, overrides = parser.parse_known_args()

    from hydra import compose, initialize_config_dir

    from specdistill.distill.config import CONFIG_DIR
    from specdistill.train.train import TrainRecipe

    with tempfile.TemporaryDirectory() as out_dir, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"out_dir={out_dir}", "logger=none",
                                                      f"train.max_steps={args.steps + 1}"])
        recipe = TrainRecipe(cfg)
        recipe.held.__enter__()
        recipe.open_out_dir()
        recipe.setup()
        batches = recipe._micro_batches("train", cfg.train.batch_size, 0)
        draw = lambda: [next(batches) for _ in range(cfg.train.grad_accum)]  # noqa: E731
        recipe.train_step(0, draw())  # warm-up
        seconds = []
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
        if profiler:
            profiler.__enter__()
        for step in range(1, args.steps + 1):
            drawn = draw()
            tokens = sum(int(batch["attention_mask"].sum()) for batch in drawn)
            start = time.perf_counter()
            recipe.train_step(step, drawn)
            seconds.append(time.perf_counter() - start)
            print(f"step {step}: {seconds[-1]:.2f} s, {tokens} tokens")
        if profiler:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(f"median step: {statistics.median(seconds):.2f} s over {args.steps} steps "
              f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
