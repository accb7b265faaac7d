"""User errors: bad configs, flags and input files, reported by entry points as one line instead of a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Input the user can fix (a config value, a flag, a file); the message names the problem and the fix."""


def require_folder(value: str, flag: str, marker: str, what: str) -> Path:
    """`value` as a folder holding `marker`; a UserError naming `flag` when it is unset or does not hold it."""
    if not value:
        raise UserError(f"{flag} is not set: pass --config.{flag}=PATH, {what}.")
    folder = Path(os.path.expanduser(str(value)))
    if not (folder / marker).is_file():
        problem = "does not exist" if not folder.exists() else f"has no {marker}"
        raise UserError(f"{flag}={value}: the folder {problem}; pass --config.{flag}=PATH, {what}.")
    return folder
