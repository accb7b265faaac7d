"""Multi-process runs: joining the coordinator, this process's devices and share of the rows, and work done once on
process 0 with its outcome on every process."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0,
                                 local_device_ids: Sequence[int] = (), initialization_timeout: int = 300) -> None:
    """Joins a multi-process run when the arguments (a config's `distributed` section) or the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, CTELM_INIT_TIMEOUT_S: launch/ scripts) name a
    coordinator; does nothing otherwise. Call it before anything touches a device."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        return
    num_processes = int(os.environ.get("JAX_NUM_PROCESSES", num_processes))
    process_id = int(os.environ.get("JAX_PROCESS_ID", process_id))
    timeout = int(os.environ.get("CTELM_INIT_TIMEOUT_S", initialization_timeout))
    local = list(local_device_ids) or None
    logging.info("joining %s as process %d of %d (timeout %d s)", address, process_id, num_processes, timeout)
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local, initialization_timeout=timeout)
    except Exception as e:  # the runtime raises several types; all mean the same to the user
        raise RuntimeError(f"process {process_id} could not join the coordinator at {address} within {timeout} s: "
                           f"{e}. Check that every process was started, the address/port is reachable, and "
                           "JAX_NUM_PROCESSES matches the number started.") from e


def local_data_mesh() -> Mesh:
    """A 1-D ("data",) mesh of this process's own devices, for work each process does without the others."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def _share_size(i: int, p: int, n: int) -> int:
    """How many of n rows process i of p holds."""
    return (i + 1) * n // p - i * n // p


def process_share(n: int) -> slice:
    """This process's contiguous share of n rows: process i of P holds rows [i*n//P, (i+1)*n//P)."""
    i, p = jax.process_index(), jax.process_count()
    return slice(i * n // p, i * n // p + _share_size(i, p, n))


def gather_shares(share: np.ndarray, n: int) -> np.ndarray:
    """The n rows, in order, on every process, from each process's `process_share(n)` rows `share` (a collective)."""
    p = jax.process_count()
    if p == 1:
        return share
    padded = np.zeros((-(-n // p), *share.shape[1:]), share.dtype)  # process_allgather needs equal shapes
    padded[: len(share)] = share
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([stacked[i, : _share_size(i, p, n)] for i in range(p)])


def run_on_process_0(fn: Callable[[], Any], what: str, result_like: np.ndarray | None = None) -> np.ndarray | None:
    """Runs `fn` on process 0 only and returns its result (an array shaped and typed like `result_like`, or None) on
    every process. Every process waits for it (a collective), and if it raises, every process raises: process 0
    its own error, the others a RuntimeError saying that process 0 failed to `what`."""
    error, result = None, None if result_like is None else np.zeros_like(result_like)
    if jax.process_index() == 0:
        try:
            value = fn()
            if result is not None:
                result = np.asarray(value, result.dtype).reshape(result.shape)
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
    failed, result = multihost_utils.broadcast_one_to_all((np.int32(error is not None), result))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"process 0 failed to {what}; its log has the error.")
    return result
