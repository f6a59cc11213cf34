"""conf/experiment/: every preset composes into the three stages `specdistill run` would start, and every `_toy`
preset trains a few steps and decodes losslessly (HASS stage B from stage A's drafter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.errors import UserError
from tests.conftest import compose, run_cli

EXPERIMENTS = sorted(path.stem for path in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
TOY = [name for name in EXPERIMENTS if name.endswith("_toy")]
SHORT_TRAIN = ["train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=1000"]
SHORT_EVAL = ["eval.num_prompts=1", "eval.max_new_tokens=12", "eval.warmup_prompts=0", "eval.hf_baselines=false"]


def preset(name: str):
    return OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")


def stage_configs(name: str, tmp: Path, *extra: str) -> dict:
    """Each stage's config as `specdistill run experiment=<name> out_dir=<tmp> <extra>` starts it: run.py's own
    `compose_stages` on the run config."""
    from hydra import initialize_config_dir

    from specdistill.cli.run import compose_stages

    run_cfg = compose("run", [f"experiment={name}", f"out_dir={tmp}", f"cache_dir={tmp / 'cache'}", *extra])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose_stages(run_cfg)


def test_there_is_a_preset_and_a_toy_variant_per_method():
    methods = {"eagle1", "eagle3", "fspad", "hass_eagle1_stage_a", "hass_eagle1_stage_b", "hass_eagle3_stage_a",
               "hass_eagle3_stage_b", "distillspec", "medusa"}
    assert methods <= set(EXPERIMENTS) and {f"{method}_toy" for method in methods} <= set(TOY)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes_into_its_three_stages(name, tmp_path):
    stage_a = tmp_path / "stage_a" / "train" / "drafter"
    stages = stage_configs(name, tmp_path / "run", *([f"init_from={stage_a}"] if "stage_b" in name else []))
    prep, train, evaluate = stages["prep"], stages["train"], stages["eval"]
    kind = preset(name).train[0].split("=", 1)[1]  # each preset's train list starts with drafter=<kind>
    assert train.drafter.kind == kind
    # the stages are chained: train reads what prep writes, eval the drafter train writes
    assert Path(train.data_dir) == Path(prep.out_dir) / "dataset" == tmp_path / "run" / "prep" / "dataset"
    assert Path(evaluate.drafter_path) == Path(train.out_dir) / "drafter" == tmp_path / "run" / "train" / "drafter"
    assert prep.target.name_or_path == train.target.name_or_path == evaluate.target.name_or_path
    if "stage_b" in name:  # stage B starts from stage A's drafter, and cannot start without one
        assert Path(train.init_from) == stage_a.resolve()
        with pytest.raises(UserError, match="init_from=<that run's out_dir>/train/drafter"):
            stage_configs(name, tmp_path / "alone")
    else:
        assert train.init_from is None
    if not name.endswith("_toy") and name != "quickstart":  # real targets: the published knobs, not the toy's
        assert not prep.target.name_or_path.startswith("toy")


def test_stage_b_without_its_stage_a_drafter_is_one_clear_error(tmp_path):
    result = run_cli("run", "experiment=hass_eagle1_stage_b_toy", f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "init_from" in result.stderr and "Traceback" not in result.stderr


def test_prep_from_points_train_at_that_dataset_and_a_missing_one_is_one_line(tmp_path):
    prep = tmp_path / "earlier" / "prep"
    stages = stage_configs("smollm2_eagle1", tmp_path / "composed", f"prep_from={prep}")
    assert Path(stages["train"].data_dir) == prep / "dataset"
    missing = run_cli("run", "experiment=quickstart", f"prep_from={tmp_path / 'nowhere'}", f"out_dir={tmp_path}/other",
                      cwd=tmp_path)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-3000:]
    assert f"prep_from={tmp_path / 'nowhere'} holds no finished dataset" in lines[0]
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_prep_from_reuses_an_earlier_runs_prep(toy_dataset, tmp_path):
    """prep_from=<prep folder>: train reads that dataset, prep does not run (no <out_dir>/prep), eval still decodes."""
    dataset, _ = toy_dataset
    result = run_cli("run", 'common=["target=toy_tiny"]', f"prep_from={dataset.parent}",
                     'train=["train.max_steps=1","train.tau_prompts=0","train.eval_batches=1"]',
                     'eval=["eval.num_prompts=1","eval.max_new_tokens=4","eval.warmup_prompts=0",'
                     '"eval.hf_baselines=false"]',
                     f"out_dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run" / "prep").exists() and (tmp_path / "run" / "eval" / "report.json").is_file()


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


@pytest.mark.slow
def test_every_toy_preset_trains_and_decodes_losslessly(toy_dataset, tmp_path):
    """Each `_toy` preset's stages as `specdistill run` composes them (run.py's `compose_stages`), on the tiny target
    (common=[target=toy_tiny]) with a few steps each, from the session's prep output; HASS stage B starts from stage
    A's drafter."""
    from hydra import initialize_config_dir

    from specdistill.cli.run import compose_stages
    from specdistill.eval.eval import evaluate
    from specdistill.train.train import train

    drafters: dict[str, Path] = {}
    for name in sorted(TOY, key=lambda n: n.replace("stage_b", "stage_z")):  # stage A before stage B
        # the session's dataset is what this preset's prep stage would write for the tiny target
        assert list(preset(name).common) == ["target=toy"] and list(preset(name).prep) == ["data=toy_chat"], name
        out_dir = tmp_path / name
        init_from = [f"init_from={drafters[name.replace('stage_b', 'stage_a')]}"] if "stage_b" in name else []
        run_cfg = compose("run", [f"experiment={name}", 'common=["target=toy_tiny"]', f"out_dir={out_dir}", *init_from])
        run_cfg.train, run_cfg.eval = [*run_cfg.train, *SHORT_TRAIN], [*run_cfg.eval, *SHORT_EVAL]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            stages = compose_stages(run_cfg)
        (out_dir / "prep").mkdir(parents=True)
        (out_dir / "prep" / "dataset").symlink_to(toy_dataset[0], target_is_directory=True)
        drafters[name] = train(stages["train"])
        assert drafters[name].resolve() == Path(stages["eval"].drafter_path).resolve()  # eval reads what train wrote
        [report] = evaluate(stages["eval"])["rows"]
        assert report["lossless_check"] == "passed", name
