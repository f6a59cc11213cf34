"""Build the toy target from scratch and report its build time and held-out loss against the unigram baseline.

    python benchmarks/toy_target_build.py                  # the default toy target (conf/target/toy.yaml)
    python benchmarks/toy_target_build.py --target toy_tiny

Builds into a fresh temporary cache, so nothing cached is reused; prints one JSON line with the numbers that go
into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from specdistill.distill.config import CONFIG_DIR
from specdistill.data_prep.config import register_configs
from specdistill.distill.toy import ToyTargetConfig, ensure_toy_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="toy", help="a toy target config in conf/target/")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prep", overrides=[f"target={args.target}", "out_dir=unused"])
    toy_cfg = OmegaConf.to_object(cfg.target.toy)
    assert isinstance(toy_cfg, ToyTargetConfig)

    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        path = ensure_toy_target(toy_cfg, cache_dir)
        wall = time.perf_counter() - started
        info = json.loads((Path(path) / "build_info.json").read_text())
    print(json.dumps({
        "target": args.target,
        "wall_seconds": round(wall, 1),
        "build_seconds": info["build_seconds"],
        "heldout_loss": round(info["heldout_loss"], 3),
        "unigram_loss": round(info["unigram_loss"], 3),
        "num_parameters": info["num_parameters"],
        "tokens_trained": info["tokens_trained"],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
