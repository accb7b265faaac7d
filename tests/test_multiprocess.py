"""Two processes of 4 CPU devices train the tiny config like one process of 8 devices, and the checkpoint they write
restores in a single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from ctelm_jax.trained import load_trained

REPO = Path(__file__).resolve().parents[1]
MESH_FLAGS = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
TIMEOUT_S = 600


def free_port() -> int:
    """A TCP port nobody listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, log: Path, devices: int, **env: str) -> subprocess.Popen:
    """`python -m ctelm_jax.train` on the tiny config, with `devices` fake CPU devices and extra environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    clean.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
    cmd = [sys.executable, "-m", "ctelm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *MESH_FLAGS]
    return subprocess.Popen(cmd, cwd=REPO, env=clean, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Waits for all; on a failure or timeout kills the rest and fails with the logs' tails."""
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if codes is None or any(codes):
        tails = "\n".join(f"--- {log.name} ---\n{log.read_text()[-4000:]}" for log in logs)
        pytest.fail(f"training exited with {codes} (None: timed out after {TIMEOUT_S} s)\n{tails}")


def metrics(workdir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoint_restores(tmp_path):
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [start(two, logs[i], 4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i), CTELM_INIT_TIMEOUT_S="120") for i in range(2)]
    finish(procs, logs)
    assert "as process 1 of 2" in logs[1].read_text()
    single_log = tmp_path / "single.log"
    finish([start(one, single_log, 8)], [single_log])

    got, want = metrics(two), metrics(one)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        for key in ("loss", "grad_norm", "target_tokens", *(k for k in want[step] if k.startswith(("loss/", "val/")))):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-6), (step, key)

    restored, reference = load_trained(two), load_trained(one)
    assert restored.step == reference.step == 8
    assert len(jax.devices()) == 8  # restored in this single process, whatever mesh wrote it
    a = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(restored.model)))
    b = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(reference.model)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-5, err_msg=str(k))
