"""What the programs show: phase lines and results on stdout, warnings and one-line user errors on stderr, every INFO
line in a log file.

`entry_point`, every program's `main`, keeps absl's stderr handler at WARNING (INFO with `--verbosity=1` or more); a
training run, `main`, and `evaluate`, `explore` and `decode` on a run add `<workdir>/log.txt`, which gets every INFO
line, ctelm_jax's and the libraries' (orbax, absl, grain, tensorstore), whatever the verbosity."""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import os
import sys
from typing import Callable, Iterator, Sequence

from absl import flags, logging
from tqdm import tqdm

from ctelm_jax import fs
from ctelm_jax.errors import UserError

LOG_FILE = "log.txt"
TRACEBACK_ENV = "CTELM_TRACEBACK"  # set to 1: entry points raise user errors with their full traceback


class _OffConsole(std_logging.Filter):
    """Orbax's warnings (a read-only manager's settings, ...) below ERROR: the log file has them."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet() -> None:
    """absl's console handler at WARNING without orbax's warnings, or at INFO with everything with --verbosity >= 1
    (flags parsed)."""
    handler = logging.get_absl_handler()
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
        handler.setLevel(std_logging.INFO)
    else:
        handler.setLevel(std_logging.WARNING)
        handler.addFilter(_OffConsole())


def say(message: str) -> None:
    """One phase line on stdout (process 0 only), also in the log file."""
    import jax

    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)  # above a progress bar, if one is drawn
    logging.info("%s", message)


def warn(message: str) -> None:
    """A warning a user can act on, on a line of its own on stderr (above a progress bar, never on it), also in the
    log file."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
    logging.info("warning: %s", message)


@contextlib.contextmanager
def log_file(workdir: str | os.PathLike) -> Iterator[None]:
    """Every INFO line (any logger) appended to `<workdir>/log.txt` within the block; nothing for a gs:// workdir or one
    that does not exist (the program's own check names it), or when an enclosing block already writes that file."""
    if fs.is_remote(workdir) or not os.path.isdir(os.fspath(workdir)):
        yield
        return
    root = std_logging.getLogger()
    path = os.path.abspath(os.path.join(os.fspath(workdir), LOG_FILE))
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        yield
        return
    handler = std_logging.FileHandler(path)
    handler.setLevel(std_logging.INFO)
    handler.setFormatter(logging.PythonFormatter())
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level or std_logging.INFO, std_logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def duration(seconds: float) -> str:
    """`1 h 05 min`, `12 min`, `40 s`."""
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class Estimate:
    """The time a run has left, said once from the median of its measured steps (the first, which compiles, left out)."""

    def __init__(self, steps_left: int, measured: int = 3):
        self.left, self.measured, self.times = steps_left, measured, []

    def step(self, seconds: float) -> None:
        """Counts one finished step that took `seconds`; says the estimate after `measured` steps past the first."""
        self.left -= 1
        self.times.append(seconds)
        if len(self.times) == self.measured + 1 and self.left > 0:
            per = sorted(self.times[1:])[self.measured // 2]
            say(f"estimate: {per:.2f} s a step, about {duration(per * self.left)} for the {self.left} steps left "
                "(validation, saves and each stage's first step, which compiles, come on top)")


def entry_point(main: Callable[[list[str]], None], prog: str,
                also: Sequence[type[Exception]] = ()) -> Callable[[list[str]], None]:
    """`main` for absl's `app.run`, with library INFO off the console (`quiet`): a UserError (or one of
    `also`) ends the program with the one line `<prog>: error: <message>` on stderr and exit code 2, Ctrl-C with exit
    code 130; CTELM_TRACEBACK=1 re-raises."""
    caught = (UserError, *also)

    @functools.wraps(main)
    def run(argv: list[str]) -> None:
        quiet()
        try:
            main(argv)
        except caught as e:
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return run
