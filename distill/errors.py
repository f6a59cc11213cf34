"""One error type for everything a user can fix, and the CLI wrapper that prints it as one clear message.

A `UserError` names the file, field or config key at fault and says what to do. Stage entry points wrap their
main function with `exit_on_user_error`, so such errors end in one line on stderr and exit status 2 instead of a
traceback. A mandatory config key left unset is reported the same way, and Ctrl-C ends in `interrupted`, exit 130.
A command line that does not compose ends the same way (distill/hydra_errors.py: `run_hydra_app`).
"""

from __future__ import annotations

import errno
import functools
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


class UserError(Exception):
    """An error caused by input or configuration; its message is shown to the user as is."""


def exit_interrupted() -> NoReturn:
    """Ctrl-C is the user's choice, not a crash: one line, the shell's status for SIGINT, no traceback."""
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_STATUS)


def raised_by_ctrl_c(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt lies in `error`'s chain: a library that catches everything (multiprocess's import
    does, with a bare `except:`) turns Ctrl-C into another exception, with the interrupt as its context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


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
        except Exception as error:
            if raised_by_ctrl_c(error):
                exit_interrupted()
            raise

    return wrapper  # type: ignore[return-value]
