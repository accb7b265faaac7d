"""User errors: bad configs, flags and input files, reported by entry points (`console.entry_point`) as one line
instead of a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(ValueError):
    """Input the user can fix (a config value, a flag, a file); the message names the problem and the fix."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or a run should hold) is not there; the message says what to pass."""


def require_folder(value: str, flag: str, marker: str, what: str) -> Path:
    """`value` as a folder holding `marker`; a UserError naming `flag` when it is unset or does not hold it."""
    if not value:
        raise UserError(f"{flag} is not set: pass --config.{flag}=PATH, {what}.")
    folder = Path(os.path.expanduser(str(value)))
    if not (folder / marker).is_file():
        problem = "does not exist" if not folder.exists() else f"has no {marker}"
        raise UserError(f"{flag}={value}: the folder {problem}; pass --config.{flag}=PATH, {what}.")
    return folder


def parse_floats(flag: str, values: Sequence[str]) -> list[float]:
    """The numbers of a list flag (`--strengths=-1,0,1`); a UserError naming `flag` when one is not a number."""
    try:
        return [float(v) for v in values]
    except ValueError:
        raise UserError(f"{flag}={','.join(values)}: not a list of numbers; pass comma-separated numbers, "
                        f"e.g. {flag}=-1,-0.5,0,0.5,1.") from None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, says a disk is full or a quota used up: an OSError with ENOSPC or
    EDQUOT, or a library's error quoting one (tensorstore's ValueError, safetensors' SafetensorError: "... No space
    left on device ...")."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # a cause may loop back
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if any(os.strerror(code) in str(error) for code in NO_SPACE):
            return True
        error = error.__cause__
    return False
