"""One error type for everything a user can fix, and the CLI wrapper that prints it as one clear message.

A `UserError` names the file, field or config key at fault and says what to do. Stage entry points wrap their
main function with `exit_on_user_error`, so such errors end in one line on stderr and exit status 2 instead of a
traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error caused by input or configuration; its message is shown to the user as is."""


def exit_on_user_error(func: F) -> F:
    """Print a `UserError` as `error: <message>` on stderr and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
