"""The one reader of the JSON files a user points at or one stage writes for another (config.json, summary.json,
stats.json, report.json, …): one clear message for each way such a file can be unusable.

Standard library and distill/errors.py only: the drafter registry reads drafter configs through it, and
`export format=hf` bundles the registry with the exported modelling code.
"""

from __future__ import annotations

import json
from pathlib import Path

from specdistill.distill.errors import UserError


def read_json(path: Path | str, what: str, hint: str = "") -> dict:
    """The JSON object in `path`, or one UserError that starts with `what` (the config key that named the file, or
    what it is), names the file and ends with `hint` (what to do) when it is missing, unreadable, not valid JSON or
    not an object."""
    path = Path(path).expanduser()
    hint = f"; {hint}" if hint else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what}: {path} is not valid JSON ({error}){hint}") from None
    except OSError as error:  # a folder, no permission, …
        raise UserError(f"{what}: {path} cannot be read ({error.strerror or error}){hint}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: {path} does not hold a JSON object{hint}")
    return value
