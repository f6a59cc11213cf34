"""A command line Hydra cannot compose (a misspelled key, a value of the wrong type, a missing config option, an
override it cannot parse) ends in one `error:` line naming the key and exit status 2, for every stage, through the
console script and through `python -m`; any other error keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    """The process ended with status 2 and printed exactly one line on stderr, an `error:` line; returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# a misspelled key of each stage → the key named in the error, and the key it was meant to be
MISSPELLED = {
    "prep": ("data.max_lenght=8", "data.max_lenght", "data.max_length"),
    "train": ("trian.max_steps=3", "trian", "train"),
    "eval": ("eval.gama=3", "eval.gama", "eval.gamma"),
    "export": ("gama=3", "gama", "gamma"),
    "import": ("sorce=x", "sorce", "source"),
    "run": ("comon=[]", "comon", "common"),
    "sweep": ("n_trails=3", "n_trails", "n_trials"),
}


@pytest.mark.parametrize("stage", MISSPELLED)
def test_a_misspelled_key_is_one_error_line_naming_it(stage, tmp_path: Path):
    override, key, meant = MISSPELLED[stage]
    line = assert_one_error_line(run_cli(stage, override, cwd=tmp_path))
    assert line.startswith(f"error: {key}: not a config key (did you mean {meant}?)") and "--help" in line, line
    assert "+" not in line  # Hydra's `To append to your config use +key=` is never the fix for a typo
    assert not list(tmp_path.iterdir())  # nothing started: no run folder


@pytest.mark.parametrize("package, override, expected", [
    ("specdistill.data_prep", "data.max_lenght=8", "error: data.max_lenght: not a config key"),
    ("specdistill.eval", "eval.gama=3", "error: eval.gama: not a config key (did you mean eval.gamma?)"),
])
def test_python_dash_m_reports_it_the_same(package, override, expected, tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", package, override], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert assert_one_error_line(result).startswith(expected)


@pytest.mark.parametrize("override, expected", [
    ("seed=abc", "error: seed: Value 'abc' of type 'str' could not be converted to Integer"),
    ("experiment=quickstrt", "error: experiment=quickstrt: no such option (did you mean quickstart?); the options: "),
    ("seed=[1", "error: seed=[1: not a valid override (no viable alternative at input '[1'"),
])
def test_other_config_errors_are_one_line_too(override, expected, tmp_path: Path):
    assert assert_one_error_line(run_cli("run", override, cwd=tmp_path)).startswith(expected)


def test_only_config_errors_are_caught():
    from hydra.errors import ConfigCompositionException

    from specdistill.distill.hydra_errors import run_hydra_app

    def bad_config() -> None:
        raise ConfigCompositionException("Could not delete from config. 'nokey' does not exist.")

    def bug() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as ended:
        run_hydra_app(bad_config)
    assert ended.value.code == 2
    with pytest.raises(RuntimeError, match="a bug"):  # a real error keeps its traceback
        run_hydra_app(bug)
