"""specdistill run: the whole pipeline in one command, prep → train → eval, each stage in its own folder.

    specdistill run experiment=quickstart                      # the toy target end to end, < 15 min on 2 CPU cores
    specdistill run experiment=quickstart 'train=["drafter=eagle1","train.max_steps=600"]'   # replace a stage's list
    specdistill run experiment=smollm2_eagle1 prep_from=runs/smollm2_eagle3/prep   # reuse an earlier run's prep

Each stage is composed from its own config (conf/prep.yaml, train.yaml, eval.yaml) with `common` + its own override
list, so everything a stage accepts on its command line it accepts here. All three are composed, and train's and
eval's value ranges checked, before the first starts, so a typo or an out-of-range value in the eval list fails at
once, not after prep and train have run:

    <out_dir>/prep/dataset   <out_dir>/train/drafter   <out_dir>/eval/report.md

With prep_from=<an earlier run's out_dir>/prep the prep stage is not run: train reads that folder's dataset (and its
feature cache), so presets sharing a prep (the smollm2_ ones) regenerate and cache the data once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import specdistill.distill.outputs  # noqa: F401  (registers the run-folder resolver conf/hydra/output uses)
from specdistill.distill.config import CACHE_DIR, CONFIG_DIR
from specdistill.distill.outputs import claim_out_dir
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.hydra_errors import config_error_message

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    out_dir: str = "${hydra:runtime.output_dir}"
    overwrite: bool = False  # write into an out_dir that holds files run did not write (distill/outputs.py)
    cache_dir: str = CACHE_DIR
    seed: int = 0
    common: list[str] = field(default_factory=list)  # overrides for every stage, e.g. [target=toy]
    prep: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    # a drafter folder the train stage starts from (its init_from=), e.g. HASS stage B from stage A's drafter
    init_from: Optional[str] = None
    # set by experiments that continue another run (HASS stage B): init_from is then required
    requires_init_from: bool = False
    # an earlier run's prep folder (<out_dir>/prep): prep is skipped, train reads its dataset and feature cache
    prep_from: Optional[str] = None


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def quoted(value: object) -> str:
    """A path as a Hydra override value ("~" and other characters are not allowed unquoted)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The stage's config as its own command line would compose it, resolved once so a bad value or interpolation
    fails here too; a `UserError` naming the stage when it does not compose."""
    try:
        cfg = compose(stage, overrides)
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"run: the {stage} stage does not compose ({config_error_message(error)}); fix "
                        f"`{stage}=[...]` or `common=[...]` (each entry is one override of `specdistill {stage}`)"
                        ) from None
    return cfg


def compose_stages(cfg: DictConfig) -> dict[str, DictConfig]:
    """{"prep", "train", "eval"} → the config each stage of `run cfg` starts with: `common` + the stage's own list,
    each stage reading the previous one's output at a fixed place (<out_dir>/prep/dataset, <out_dir>/train/drafter);
    train's and eval's value ranges checked, so a bad value fails here, before prep starts. Hydra must be initialised
    on conf/ (run's `hydra.main` does it; elsewhere `hydra.initialize_config_dir(CONFIG_DIR)`)."""
    # each stage's module registers its schema in Hydra's ConfigStore when imported
    import specdistill.data_prep.prep  # noqa: F401
    import specdistill.eval.eval  # noqa: F401
    import specdistill.train.train  # noqa: F401
    from specdistill.eval.config import check_loop_ranges
    from specdistill.train.config import check_ranges

    if not any((cfg.common, cfg.prep, cfg.train, cfg.eval)):
        raise UserError("run: nothing chosen; pick an experiment, e.g. `specdistill run experiment=quickstart` "
                        "(conf/experiment/ lists them), or give the stage lists common=, prep=, train=, eval=")
    if cfg.requires_init_from and cfg.init_from is None:
        raise UserError("run: this experiment continues another run's drafter (e.g. HASS stage B from stage A); pass "
                        "init_from=<that run's out_dir>/train/drafter")
    out_dir = Path(cfg.out_dir).expanduser()
    prep_dir = out_dir / "prep" if cfg.prep_from is None else Path(cfg.prep_from).expanduser().resolve()
    common = [*cfg.common, f"cache_dir={quoted(cfg.cache_dir)}", f"seed={cfg.seed}"]
    start_from = [] if cfg.init_from is None else [f"init_from={quoted(Path(cfg.init_from).expanduser().resolve())}"]
    stages = {
        "prep": compose_stage("prep", [*common, *cfg.prep, f"out_dir={quoted(prep_dir)}"]),
        "train": compose_stage("train", [*common, *cfg.train, *start_from,
                                         f"data_dir={quoted(prep_dir / 'dataset')}",
                                         f"out_dir={quoted(out_dir / 'train')}"]),
        "eval": compose_stage("eval", [*common, *cfg.eval, f"drafter_path={quoted(out_dir / 'train' / 'drafter')}",
                                       f"out_dir={quoted(out_dir / 'eval')}"]),
    }
    # each stage checks its ranges again when it starts; here they fail before prep, not after prep and train
    check_ranges(stages["train"])
    check_loop_ranges(stages["eval"].eval)
    return stages


def run(cfg: DictConfig) -> Path:
    """Compose and check every stage (`compose_stages`), then run the three; returns the eval folder."""
    from specdistill.data_prep.prep import prep
    from specdistill.eval.eval import evaluate
    from specdistill.train.train import train

    stages = compose_stages(cfg)
    out_dir = Path(cfg.out_dir).expanduser()
    if cfg.prep_from is not None and not (Path(stages["train"].data_dir) / "dataset_dict.json").is_file():
        raise UserError(f"run: prep_from={cfg.prep_from} holds no finished dataset ({stages['train'].data_dir} has "
                        "no dataset_dict.json); pass the prep folder of a finished run (<its out_dir>/prep), or drop "
                        "prep_from to run prep here")
    with claim_out_dir(out_dir, "run", cfg.overwrite):  # the out_dir rule; each stage checks its own folder too
        if cfg.prep_from is None:
            log.info("[1/3] prep → %s", out_dir / "prep")
            prep(stages["prep"])
        else:
            log.info("[1/3] prep: reusing %s", stages["prep"].out_dir)
        log.info("[2/3] train → %s", out_dir / "train")
        train(stages["train"])
        log.info("[3/3] eval → %s", out_dir / "eval")
        evaluate(stages["eval"])
    log.info("done: %s", ", ".join(f"{stage}: {stage_cfg.out_dir}" for stage, stage_cfg in stages.items()))
    return out_dir / "eval"


@hydra.main(config_path=CONFIG_DIR, config_name="run", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
