"""One error type for everything a user can fix, and the CLI wrapper that prints it as one clear message.

A `UserError` names the file, field or config key at fault and says what to do. Stage entry points wrap their
main function with `exit_on_user_error`, so such errors end in one line on stderr and exit status 2 instead of a
traceback. A mandatory config key left unset is reported the same way, and Ctrl-C ends in `interrupted`, exit 130.
"""

from __future__ import annotations

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


class UserError(Exception):
    """An error caused by input or configuration; its message is shown to the user as is."""


def exit_interrupted() -> NoReturn:
    """Ctrl-C is the user's choice, not a crash: one line, the shell's status for SIGINT, no traceback."""
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_STATUS)


def exit_on_user_error(func: F) -> F:
    """Print a `UserError` (or an unset mandatory config key) as `error: <message>` on stderr and exit with status
    2; Ctrl-C exits with 130 (`exit_interrupted`)."""

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
        except KeyboardInterrupt:
            exit_interrupted()

    return wrapper  # type: ignore[return-value]
