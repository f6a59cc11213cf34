"""Shared fixtures: a per-session cache with the tiny toy target, Hydra composition, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session (and for the CLI processes the tests start). Its toy_target folder is shared by
    every test session on the machine ($SPECDISTILL_TEST_CACHE, default ~/.cache/specdistill-tests): the default
    toy target takes minutes to build, and CI's slow and serving sessions both need it. Builds are keyed by their
    settings and build version, locked, and renamed into place when complete (distill/toy.py ensure_toy_target)."""
    path = tmp_path_factory.mktemp("specdistill_cache")
    shared = Path(os.environ.get("SPECDISTILL_TEST_CACHE", Path.home() / ".cache" / "specdistill-tests")) / "toy_target"
    shared.mkdir(parents=True, exist_ok=True)
    (path / "toy_target").symlink_to(shared, target_is_directory=True)
    os.environ["SPECDISTILL_CACHE"] = str(path)
    return path


def compose(config_name: str, overrides: list[str]):
    """The config a stage would run with, composed from conf/ with its schema (no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from specdistill.distill.config import CONFIG_DIR
    from specdistill.data_prep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: the G-tests run thousands of generations of a 1-layer, 16-wide model, whose
    ops are too small to gain from a second thread. On an idle machine it changes nothing (5.0 vs 5.1 ms a
    generation); while another process loads the other core, two threads wait on each other (9 vs 29 ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_tiny_path(cache_dir: Path) -> Path:
    from specdistill.distill.targets import resolve_target_path

    cfg = compose("prep", ["target=toy_tiny", f"cache_dir={cache_dir}", f"out_dir={cache_dir / 'unused'}"])
    return Path(resolve_target_path(cfg.target, cfg.cache_dir))


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tiny_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_tiny_path)


@pytest.fixture(scope="session")
def tiny(toy_tiny_path: Path, toy_tokenizer):
    """The tiny toy target (model and FrozenTarget) and 6 toy-bench prompts rendered with its chat template."""
    from transformers import LlamaForCausalLM

    from specdistill.distill.target import FrozenTarget
    from specdistill.eval.benches import BenchConfig, load_bench, render_prompt

    model = LlamaForCausalLM.from_pretrained(toy_tiny_path)
    prompts = [render_prompt(toy_tokenizer, prompt, chat_template=True)
               for prompt in load_bench(BenchConfig(name="toy"), num_prompts=6)]
    return SimpleNamespace(model=model, target=FrozenTarget(model), prompts=prompts)


@pytest.fixture(scope="module")
def target(toy_tiny_path: Path):
    """A FrozenTarget of the tiny toy target of its own, per test module (`tiny.target` is shared by the session)."""
    from transformers import AutoModelForCausalLM

    from specdistill.distill.target import FrozenTarget

    return FrozenTarget(AutoModelForCausalLM.from_pretrained(toy_tiny_path))


def random_drafter(kind: str, target, *, token_counts=None, target_name_or_path: str | None = None,
                   perturb: float = 0.0, **options):
    """An untrained drafter of a registered `kind` for `target`, in eval mode, with every norm weight drawn from
    0.5..1.5 (a dropped or misplaced norm shows) and, when `perturb` > 0, every other weight moved by perturb · N(0, 1)
    (EAGLE-1's zero fc bias and Medusa's zero blocks become nonzero). `token_counts`: the draft vocabulary's token
    frequencies (EAGLE-3; pass counts that do not favour the first ids so d2t/t2d matter); EAGLE-3 taps the default
    for the target's depth ([0, 1, -1] on the tiny toy). Seeded: the same call gives the same weights."""
    import torch

    from specdistill.distill.drafters import drafter_kind
    from specdistill.distill.drafters.feature import BuildContext

    torch.manual_seed(0)
    unit = drafter_kind(kind)
    context = BuildContext(target, token_counts=token_counts, target_name_or_path=target_name_or_path)
    drafter = unit.model_class.build(unit.options(**options), context).eval()
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif perturb:
                parameter.add_(perturb * torch.randn_like(parameter))
    return drafter


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `specdistill <args>` as a user would, in `cwd`, with the session's cache."""
    command = [sys.executable, "-c", "from specdistill.cli.main import main; main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# vLLM's τ and α per position against `specdistill eval`'s for the same drafter (benchmarks/vllm_agreement.py's rows):
# a wrong tapped layer, a lost norm flag or d2t ids instead of offsets leave a drafter loading fine and accepting close
# to nothing, far outside these bands (measured: BENCHMARKS.md)
VLLM_TAU_TOLERANCE = 0.1
VLLM_ALPHA_TOLERANCE = 0.08


def assert_vllm_agrees(rows: dict, ours: dict) -> None:
    """Every vLLM row of agreement.json (`rows`, ours popped off) is lossless inside vLLM and within the tolerances of
    `ours` (the "specdistill eval" row)."""
    for name, row in rows.items():
        assert row["lossless"], f"{name}: vLLM's outputs with the drafter differ from its outputs without it"
        assert abs(row["tau"] - ours["tau"]) <= VLLM_TAU_TOLERANCE, (name, row["tau"], ours["tau"])
        assert ours["alpha"][0] is not None and row["alpha"][0] is not None, (name, row["alpha"], ours["alpha"])
        for position, (theirs, mine) in enumerate(zip(row["alpha"], ours["alpha"], strict=True)):
            # a position neither decoder reached has no α (None); one reached by only one of them is a difference
            assert (theirs is None) == (mine is None), (name, position, theirs, mine)
            if mine is not None:
                assert abs(theirs - mine) <= VLLM_ALPHA_TOLERANCE, (name, position, theirs, mine)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """`specdistill prep target=toy_tiny data=toy_chat`, run once: its dataset folder and the finished process."""
    out_dir = tmp_path_factory.mktemp("toy_prep")
    result = run_cli("prep", "target=toy_tiny", "data=toy_chat", f"out_dir={out_dir}", cwd=out_dir)
    assert result.returncode == 0, result.stderr
    return out_dir / "dataset", result


# the decoded τ on 2 validation prompts (train's default, 8, is for real runs; test_train checks it at 8)
TRAIN_FAST = ["target=toy_tiny", "optim.warmup_steps=10", "optim.lr=2e-3", "train.batch_size=8", "train.tau_prompts=2",
              "train.checkpoint_every=1000"]
EAGLE3_FAST = ["drafter.draft_vocab_size=512", "objective.ttt_steps=3"]  # EAGLE-3's own options, made small


@pytest.fixture(scope="session")
def trained_drafter(tmp_path_factory: pytest.TempPathFactory, toy_dataset):
    """`trained_drafter(kind)`: `specdistill train drafter=<kind>` for 150 steps on the tiny toy target, run once per
    session → (its out_dir, the finished process)."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def train(kind: str) -> tuple[Path, subprocess.CompletedProcess]:
        if kind not in runs:
            out_dir = tmp_path_factory.mktemp(f"train_{kind}")
            result = run_cli("train", f"drafter={kind}", f"data_dir={toy_dataset[0]}", f"out_dir={out_dir}",
                             "train.max_steps=150", "train.eval_every=150", "train.tau_prompts=8",
                             *(arg for arg in TRAIN_FAST if not arg.startswith("train.tau_prompts=")),
                             *(EAGLE3_FAST if kind == "eagle3" else []), cwd=out_dir)
            runs[kind] = out_dir, result
        return runs[kind]

    return train
