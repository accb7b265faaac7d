"""One run per workdir: `<workdir>/lock.json` names the process that holds it (host, pid, start time).

`hold(workdir)` holds it for a run. Process 0 takes it; the other processes of a multi-process run share it and
learn whether it was taken. A second run refuses with a `UserError` naming the holder. A lock whose pid no longer
exists on this host is stale (a killed run) and is taken over, and so is one whose pid now belongs to a process that
started after the lock was written (a reused pid: a restarted container's pid 1, say). A lock from another host
cannot be checked from here, so it is refused with how to clear it.

On a local disk the lock file is created exclusively (O_EXCL: atomic, NFS included). gs:// has no exclusive create
through epath: the lock is checked, written, then read back (of two runs starting together the later write wins
and the other run refuses once it reads it back), so two runs whose checks and writes interleave can both start.
That is the limit on object stores: best effort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import socket
from typing import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ctelm_jax import fs
from ctelm_jax.errors import UserError

LOCK_FILE = "lock.json"
_ATTEMPTS = 3  # create, or take over a stale lock, this many times before giving up (runs racing for it)
_CLOCK_SLACK_S = 60  # a process that started this much after its pid's lock did is another process (pid reuse)


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process a lock names."""

    host: str
    pid: int
    started: str  # local time with offset, ISO 8601

    @classmethod
    def this_process(cls) -> Holder:
        """This process, started now."""
        return cls(socket.gethostname(), os.getpid(), datetime.datetime.now().astimezone().isoformat("T", "seconds"))

    def describe(self) -> str:
        """'pid P on host H, started T'."""
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def _process_start(pid: int) -> float | None:
    """When process `pid` of this host started (seconds since the epoch); None where /proc does not say."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in pathlib.Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime; the fields after "(comm)" start at 3
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _runs(holder: Holder) -> bool:
    """Whether the lock's process (on this host) still runs: its pid exists and did not start after the lock."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    started = _process_start(holder.pid)
    locked = datetime.datetime.fromisoformat(holder.started).timestamp()
    return started is None or started <= locked + _CLOCK_SLACK_S


def read_lock(workdir: epath.Path) -> Holder | None:
    """The holder of the workdir's lock, None when it is not locked; a UserError when the lock cannot be read."""
    path = workdir / LOCK_FILE
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}): a run is starting on {workdir} right now, or the lock is "
                        f"damaged. If no run uses this workdir, delete {path} and start again.") from e


def _create(workdir: epath.Path, holder: Holder) -> bool:
    """Writes the lock unless there is one; whether this process now holds it."""
    path, text = workdir / LOCK_FILE, json.dumps(dataclasses.asdict(holder))
    if not fs.is_remote(path):
        try:
            fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if path.exists():
        return False
    path.write_text(text)
    return read_lock(workdir) == holder


def acquire(workdir: epath.Path) -> Holder:
    """Takes the workdir's lock for this process (taking over a stale one); a UserError naming the holder when a
    live run has it."""
    me, path = Holder.this_process(), workdir / LOCK_FILE
    for _ in range(_ATTEMPTS):
        if _create(workdir, me):
            return me
        held = read_lock(workdir)
        if held is None:  # released since
            continue
        if held.host != me.host:
            raise UserError(
                f"{workdir} is locked by a run on another host ({held.describe()}), which cannot be checked from "
                f"{me.host}. If that run is gone (killed, its machine lost), delete {path} and start again; "
                "otherwise use another --workdir.")
        if _runs(held):
            raise UserError(
                f"{workdir} is in use by another run: {held.describe()} (lock {path}). Wait for it to finish or stop "
                f"it, or use another --workdir; if pid {held.pid} is not a run on this workdir, delete {path}.")
        logging.warning("taking over the stale lock %s: %s, and that process no longer runs.", path, held.describe())
        if read_lock(workdir) == held:
            path.unlink(missing_ok=True)
    raise UserError(f"{workdir}: other runs are starting on it at the same time; could not take {path}.")


def release(workdir: epath.Path, holder: Holder) -> None:
    """Removes the workdir's lock if `holder` still holds it."""
    with contextlib.suppress(UserError):
        if read_lock(workdir) == holder:
            (workdir / LOCK_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: epath.Path) -> Iterator[None]:
    """Holds the workdir's lock for the block, released at its end (also on an exception). Call it on every process
    of a run: process 0 takes the lock, the others wait for its verdict and refuse with it."""
    holder, refusal = None, None
    if jax.process_index() == 0:
        try:
            holder = acquire(workdir)
        except UserError as e:
            refusal = e
    taken = refusal is None
    if jax.process_count() > 1:
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
    if refusal is not None:
        raise refusal
    if not taken:
        raise UserError(f"process 0 could not take the lock of {workdir}; its log says which run holds it.")
    try:
        yield
    finally:
        if holder is not None:
            release(workdir, holder)
