"""Online-training cost: one drafter training step against the frozen target's forward pass on the same batch.

    python benchmarks/train_throughput.py                         # toy target on CPU, EAGLE-1 and EAGLE-3 (ttt 7)
    python benchmarks/train_throughput.py --reply-fraction 0.5    # loss mask on the last half of each row (chat-like)
    python benchmarks/train_throughput.py --shape llama8b --batch 2 --seq 2048     # random Llama-8B shape, bf16, GPU

The target's forward (logits and the tapped features, as training needs them) is the floor of online training;
the ratio step ÷ forward says what the drafter adds. The loss mask covers every token by default (the most work);
`--reply-fraction f` puts it on the last f of each row, as in chat data where only replies are trained (the toy chat
data has 52% of its tokens under the mask), since the LM head and losses run on trained rows only. Both are timed in the same process, interleaved repetition by
repetition, after warm-up, with device sync around every timer; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch

from specdistill.distill.drafters import drafter_kind
from specdistill.distill.drafters.eagle3 import default_eagle3_layers
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.objectives import FeatureObjective
from specdistill.distill.target import FrozenTarget


def load_target(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape == "toy":
        from hydra import compose, initialize_config_dir

        from specdistill.distill.config import CONFIG_DIR
        from specdistill.data_prep.config import register_configs
        from specdistill.distill.targets import load_target_model

        register_configs()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="prep", overrides=["target=toy", "out_dir=unused"])
        model = load_target_model(cfg.target, os.path.expanduser(cfg.cache_dir), device=device)
        return model, default_eagle3_layers(model.config.num_hidden_layers)
    config = LlamaConfig(  # Llama-3.1-8B's shape, random weights
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False), default_eagle3_layers(config.num_hidden_layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "llama8b"], default="toy")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--reply-fraction", type=float, default=1.0, help="share of each row under the loss mask")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, eagle3_layers = load_target(args.shape, device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = attention_mask.clone()
    loss_mask[:, : round(args.seq * (1 - args.reply_fraction))] = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    results = {}
    for kind, layers, weights in (
        ("eagle1", [-1], FeatureObjective()),
        ("eagle3", eagle3_layers, FeatureObjective(feature_weight=0.0, token_weight=1.0, noise=0.0, ttt_steps=args.ttt_steps)),
    ):
        target, unit = FrozenTarget(model), drafter_kind(kind)
        options = unit.options(feature_layers=layers, **({"draft_vocab_size": 32000} if kind == "eagle3" else {}))
        drafter = unit.model_class.build(options, BuildContext(target)).to(device)
        optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-4)

        def forward_only() -> None:
            target(input_ids, attention_mask, feature_layers=layers)

        def training_step() -> None:
            with autocast:
                output = target(input_ids, attention_mask, feature_layers=layers, for_training=True)
                loss = drafter.training_loss(input_ids, attention_mask, loss_mask, output, weights)
            (loss.loss_sum / loss.num_tokens).backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up
            forward_only(), training_step()
        forward_times, step_times = [], []
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            forward_times.append(timed(forward_only, device))
            step_times.append(timed(training_step, device))
        forward, step = statistics.median(forward_times), statistics.median(step_times)
        label = f"{kind} (ttt {weights.ttt_steps})" if kind == "eagle3" else kind
        results[label] = {"target_forward_s": round(forward, 4), "train_step_s": round(step, 4),
                          "ratio": round(step / forward, 2)}
    print(json.dumps({
        "shape": args.shape, "batch": args.batch, "seq": args.seq, "reply_fraction": args.reply_fraction,
        "device": str(device), "results": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}",
        "date": date.today().isoformat(),
    }, indent=1))


if __name__ == "__main__":
    main()
