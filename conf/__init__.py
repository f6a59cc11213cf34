"""Hydra configs (YAML only); this file lets an installed copy locate them."""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent)
