"""One error type for everything a user can fix, and the CLI wrapper that prints it as one clear message.

A `UserError` names the file, field or config key at fault and says what to do. Stage entry points wrap their
main function with `exit_on_user_error`, so such errors end in one line on stderr and exit status 2 instead of a
traceback. A mandatory config key left unset is reported the same way, and Ctrl-C ends in `interrupted`, exit 130.
Stage commands run their Hydra app through `run_hydra_app`, so a command line that does not compose (a misspelled key,
a value of the wrong type, a missing config option) ends the same way, before anything starts.
"""

from __future__ import annotations

import difflib
import errno
import functools
import os
import sys
from typing import Any, Callable, NoReturn, TypeVar

try:  # omegaconf is for training; the copy of this file `export format=hf` bundles loads without it
    from omegaconf.errors import MissingMandatoryValue
except ImportError:  # then nothing raises it
    class MissingMandatoryValue(Exception):  # type: ignore[no-redef]
        """Stand-in for omegaconf's, so `exit_on_user_error` reads the same without omegaconf."""

F = TypeVar("F", bound=Callable[..., Any])
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT
# a folder the user cannot write (or that is full): the user's to fix, so one line, not a traceback
FOLDER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
FULL_ERROR = "HYDRA_FULL_ERROR"  # Hydra raises its errors instead of printing them while this is "1"


class UserError(Exception):
    """An error caused by input or configuration; its message is shown to the user as is."""


def exit_interrupted() -> NoReturn:
    """Ctrl-C is the user's choice, not a crash: one line, the shell's status for SIGINT, no traceback."""
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_STATUS)


def exit_on_user_error(func: F) -> F:
    """Print a `UserError`, an unset mandatory config key, or a folder that cannot be written (permissions, read-only,
    full) as `error: <message>` on stderr and exit with status 2; Ctrl-C exits with 130 (`exit_interrupted`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except MissingMandatoryValue as error:  # a `???` key the command line did not set
            key = error.full_key or "a mandatory key"
            print(f"error: {key} is required but was not set; add {key}=<value> to the command line "
                  "(`--help` lists the keys)", file=sys.stderr, flush=True)
            sys.exit(2)
        except OSError as error:
            if error.errno not in FOLDER_ERRNOS:  # not about where the stage reads or writes: a real bug, traced
                raise
            where = f": {error.filename}" if error.filename else ""
            print(f"error: {error.strerror}{where}; check that folder's permissions and free space, or point out_dir "
                  "(or the path named) elsewhere", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            exit_interrupted()

    return wrapper  # type: ignore[return-value]


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
