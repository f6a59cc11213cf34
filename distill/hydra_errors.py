"""Stage commands run their Hydra app through `run_hydra_app`, so a command line that does not compose (a misspelled
key, a value of the wrong type, a missing config option) ends like a `UserError`: one `error:` line, exit status 2,
before anything starts. Kept apart from distill/errors.py, which `export format=hf` bundles with a drafter's modelling
code and which must not import Hydra.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Callable

FULL_ERROR = "HYDRA_FULL_ERROR"  # Hydra raises its errors instead of printing them while this is "1"


def config_error_message(error: Exception) -> str:
    """A Hydra or OmegaConf error of a config that does not compose, on one line: the key or option at fault, the
    closest valid one, what to do. Never Hydra's `+key=` hint: adding a key no schema reads does not fix a typo."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:  # a key the schema does not have
        parent, key = cause.parent_node, str(cause.key)
        close = difflib.get_close_matches(key, [str(k) for k in parent] if isinstance(parent, DictConfig) else [], n=1)
        meant = f" (did you mean {cause.full_key.removesuffix(key)}{close[0]}?)" if close else ""
        return f"{cause.full_key}: not a config key{meant}; `--help` lists the keys"
    if isinstance(error, MissingConfigException) and error.options:  # a config group option that does not exist
        group, _, name = error.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, error.options, n=1)
        meant = f" (did you mean {close[0]}?)" if close else ""
        return f"{group}={name}: no such option{meant}; the options: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: not a valid override ({' '.join(error.message.split())})"
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:  # a value of the wrong type, a bad interpolation
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return " ".join(str(error).split())


def run_hydra_app(main: Callable[[], Any]) -> Any:
    """Run a stage's Hydra app (its `hydra.main` function) so that a command line that does not compose ends like a
    `UserError`: one `error:` line (`config_error_message`), exit status 2. Any other error propagates with its whole
    traceback (exit status 1), Hydra's frames included."""
    from hydra.errors import CompactHydraException

    # Hydra prints its own errors (several lines, a `+key=` hint) and exits 1, unless HYDRA_FULL_ERROR=1 makes them
    # propagate to here
    previous = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"
    try:
        return main()
    except CompactHydraException as error:  # the errors Hydra means for the user: composing, parsing an override
        print(f"error: {config_error_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if previous is None:
            del os.environ[FULL_ERROR]
        else:
            os.environ[FULL_ERROR] = previous


def quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, when installed, warns on every import on a machine without a GPU; name the CPU for it."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
