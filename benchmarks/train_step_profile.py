"""Where a training step's time goes, from a prepared dataset (and its feature cache): `specdistill train`'s own
recipe is set up with the given overrides, then steps are timed; `--profile` adds the torch profiler's operator table
(matmuls, softmax, the cache read, the optimizer), `--flops` each step's floating-point work by module and the rate it
ran at, beside a plain matmul's rate measured in the same process (so a shared CPU slows both alike).

    python benchmarks/train_step_profile.py data_dir=/tmp/prep/dataset target=smollm2_135m_instruct drafter=eagle3 \
        features.source=cache train.batch_size=4 train.max_length=512 [--steps 4] [--profile] [--flops]

Every argument but --steps, --profile and --flops is a `specdistill train` override; the first step is a warm-up and
is not timed. The FLOPs are counted after the timing, on the same batches again (torch's FlopCounterMode: matmuls and
attention, forward and backward), so the counting does not slow the timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def matmul_rate(rows: int, inner: int, cols: int, repeats: int = 20) -> float:
    """GFLOP/s of an fp32 [rows, inner] @ [inner, cols] matmul on this CPU now: about the most the step's matmuls
    reach."""
    left, right = torch.randn(rows, inner), torch.randn(inner, cols)
    for _ in range(3):
        left @ right
    start = time.perf_counter()
    for _ in range(repeats):
        left @ right
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start) / 1e9


def count_flops(recipe, drawn_steps: list, seconds: list[float]) -> None:
    """Each step's GFLOP (its drafter's direct submodules apart: what a cost cut must aim at) and GFLOP/s, then the
    matmul reference rate at the draft layer's shape."""
    from torch.utils.flop_counter import FlopCounterMode

    for step, (drawn, took) in enumerate(zip(drawn_steps, seconds), start=1):
        with FlopCounterMode(display=False) as counter:
            recipe.train_step(step, drawn)
        total = counter.get_total_flops() / 1e9
        prefix = f"{type(recipe.module).__name__}.drafter."
        by_module = {}  # the drafter's direct submodules, its decoder layers each apart (e.g. lm_head, layers.0, fc)
        for name, counts in counter.get_flop_counts().items():
            part = name.removeprefix(prefix)
            top_level = part.count(".") == 0 or (part.startswith("layers.") and part.count(".") == 1)
            if name.startswith(prefix) and top_level:
                by_module[part] = sum(counts.values()) / 1e9
        parts = ", ".join(f"{name} {flops:.1f}" for name, flops in sorted(by_module.items(), key=lambda kv: -kv[1]))
        print(f"step {step}: {total:.1f} GFLOP ({parts}; unattributed: the target's logits, attention, some "
              f"backward work), {total / took:.1f} GFLOP/s")
    hidden = recipe.drafter.config.hidden_size
    print(f"reference fp32 matmul [2048, {2 * hidden}] @ [{2 * hidden}, {hidden}]: "
          f"{matmul_rate(2048, 2 * hidden, hidden):.1f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="also print the torch profiler's operator table")
    parser.add_argument("--flops", action="store_true", help="also count each step's FLOPs and the rate it ran at")
    args, overrides = parser.parse_known_args()

    from hydra import compose, initialize_config_dir

    from specdistill.distill.config import CONFIG_DIR
    from specdistill.train.train import TrainRecipe

    with tempfile.TemporaryDirectory() as out_dir, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"out_dir={out_dir}", "logger=none",
                                                      f"train.max_steps={2 * args.steps + 1}"])
        recipe = TrainRecipe(cfg)
        recipe.held.__enter__()
        recipe.open_out_dir()
        recipe.setup()
        batches = recipe._micro_batches("train", cfg.train.batch_size, 0)
        draw = lambda: [next(batches) for _ in range(cfg.train.grad_accum)]  # noqa: E731
        recipe.train_step(0, draw())  # warm-up
        seconds, drawn_steps = [], []
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
        if profiler:
            profiler.__enter__()
        for step in range(1, args.steps + 1):
            drawn_steps.append(draw())
            tokens = sum(int(batch["attention_mask"].sum()) for batch in drawn_steps[-1])
            start = time.perf_counter()
            recipe.train_step(step, drawn_steps[-1])
            seconds.append(time.perf_counter() - start)
            print(f"step {step}: {seconds[-1]:.2f} s, {tokens} tokens")
        if profiler:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(f"median step: {statistics.median(seconds):.2f} s over {args.steps} steps "
              f"(torch threads {torch.get_num_threads()})")
        if args.flops:
            count_flops(recipe, drawn_steps, seconds)


if __name__ == "__main__":
    main()
