"""conf/experiment/: every preset composes into the three stages `specdistill run` would start, and every `_toy`
preset trains a few steps and decodes losslessly (HASS stage B from stage A's drafter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from specdistill.distill.config import CONFIG_DIR
from tests.conftest import compose, run_cli

EXPERIMENTS = sorted(path.stem for path in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
TOY = [name for name in EXPERIMENTS if name.endswith("_toy")]
SHORT_TRAIN = ["train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=1000"]
SHORT_EVAL = ["eval.num_prompts=1", "eval.max_new_tokens=12", "eval.warmup_prompts=0", "eval.hf_baselines=false"]


def preset(name: str):
    return OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")


def stage_configs(name: str, tmp: Path, common: list[str] | None = None) -> dict:
    """Each stage's config as `specdistill run experiment=<name>` composes it (run.py's compose_stage)."""
    from hydra import initialize_config_dir

    import specdistill.eval.eval  # noqa: F401  (each stage module registers its schema)
    import specdistill.train.train  # noqa: F401
    from specdistill.cli.run import compose_stage

    init_from = [f"init_from={tmp}"] if "stage_b" in name else []
    run_cfg = compose("run", [f"experiment={name}", f"out_dir={tmp}", *init_from])
    stage_common = [*(common or run_cfg.common), f"cache_dir={tmp / 'cache'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return {
            "prep": compose_stage("prep", [*stage_common, *run_cfg.prep, f"out_dir={tmp / 'prep'}"]),
            "train": compose_stage("train", [*stage_common, *run_cfg.train, *init_from,
                                             f"data_dir={tmp}", f"out_dir={tmp / 'train'}"]),
            "eval": compose_stage("eval", [*stage_common, *run_cfg.eval, f"drafter_path={tmp}", f"out_dir={tmp / 'e'}"]),
        }


def test_there_is_a_preset_and_a_toy_variant_per_method():
    methods = {"eagle1", "eagle3", "fspad", "hass_eagle1_stage_a", "hass_eagle1_stage_b", "hass_eagle3_stage_a",
               "hass_eagle3_stage_b", "distillspec", "medusa"}
    assert methods <= set(EXPERIMENTS) and {f"{method}_toy" for method in methods} <= set(TOY)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes_into_its_three_stages(name, tmp_path):
    stages = stage_configs(name, tmp_path)
    train = stages["train"]
    kind = preset(name).train[0].split("=", 1)[1]  # each preset's train list starts with drafter=<kind>
    assert train.drafter.kind == kind
    if "stage_b" in name:
        assert train.init_from == str(tmp_path)
    if not name.endswith("_toy") and name != "quickstart":  # real targets: the published knobs, not the toy's
        assert not stages["prep"].target.name_or_path.startswith("toy")


def test_stage_b_without_its_stage_a_drafter_is_one_clear_error(tmp_path):
    result = run_cli("run", "experiment=hass_eagle1_stage_b_toy", f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "init_from" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("stage_list, message", [
    ('eval=["eval.top_p=2"]', "error: eval.top_p=2.0 is out of range: it must be a number in (0, 1]"),
    ('eval=["eval.gama=3"]', "error: run: the eval stage does not compose (eval.gama: not a config key (did you mean "
                             "eval.gamma?)"),
])
def test_run_checks_every_stage_before_the_first_starts(stage_list, message, cache_dir, tmp_path):
    """A bad eval setting fails before prep starts, not after prep and train ran (short stages, in case it does not)."""
    result = run_cli("run", 'common=["target=toy_tiny"]', 'prep=["data=toy_chat"]',
                     'train=["train.max_steps=1","train.tau_prompts=0","train.eval_batches=1"]', stage_list,
                     f"out_dir={tmp_path}/run", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]
    assert not (tmp_path / "run" / "prep").exists()


def test_every_toy_preset_trains_and_decodes_losslessly(toy_dataset, tmp_path):
    """Each `_toy` preset's own train and eval lists on the tiny target, a few steps each; HASS stage B starts from
    stage A's drafter."""
    from specdistill.eval.eval import evaluate
    from specdistill.train.train import train

    drafters: dict[str, Path] = {}
    for name in sorted(TOY, key=lambda n: n.replace("stage_b", "stage_z")):  # stage A before stage B
        run_cfg = preset(name)
        out_dir = tmp_path / name
        init_from = []
        if "stage_b" in name:
            init_from = [f"init_from={drafters[name.replace('stage_b', 'stage_a')]}"]
        train_cfg = compose("train", ["target=toy_tiny", *run_cfg.train, *SHORT_TRAIN, *init_from,
                                      f"data_dir={toy_dataset[0]}", f"out_dir={out_dir / 'train'}"])
        drafters[name] = train(train_cfg)
        eval_cfg = compose("eval", ["target=toy_tiny", *run_cfg.eval, *SHORT_EVAL, f"drafter_path={drafters[name]}",
                                    f"out_dir={out_dir / 'eval'}"])
        [report] = evaluate(eval_cfg)
        assert report["lossless_check"] == "passed", name
