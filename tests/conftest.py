"""Test-wide settings: 8 fake CPU devices so sharding tests see a mesh, and shared tiny fixtures."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the programs they start) compile the same tiny programs: compile each once per checkout.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

from ctelm_jax.weights.default import default_gguf_path  # noqa: E402
from ctelm_jax.weights.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The embedded SmolLM2 tokenizer (with the placeholder token), read from its GGUF."""
    return Tokenizer.from_gguf(default_gguf_path())


@pytest.fixture(scope="session")
def main_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny run made by the README's main job (`python -m ctelm_jax.main` on configs/tiny.py, real corpus embeddings
    from the embedded encoder), in a shell without JAX_PLATFORMS as a user's: its workdir and what it printed."""
    workdir = tmp_path_factory.mktemp("main") / "run"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "ctelm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                          "--config.model.domain_dim=384", "--config.data.embeddings=",
                          "--config.data.max_records=300"], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"main exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return workdir, out


def pickle_trap(path: Path) -> Path:
    """Writes a pickle at `path` that, if anything ever unpickles it, creates a folder; returns that folder's path."""
    import pickle

    marker = path.with_name(path.name + ".was-unpickled")

    class Trap:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path.write_bytes(pickle.dumps(Trap()))
    return marker


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (a coordinator's, an emulator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int] | None:
    """The processes' exit codes, or None when one outlives `timeout_s`; none is left running either way."""
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


def write_step0_run(workdir: Path, step: int = 3) -> Path:
    """A run directory of configs/tiny.py whose checkpoint at `step` holds its freshly built model (no training)."""
    import numpy as np
    from flax import nnx

    from configs.tiny import get_config
    from ctelm_jax.run.build import build_elm, load_tokenizer
    from ctelm_jax.run.checkpoint import Checkpointer

    config = get_config()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = build_elm(config.model, load_tokenizer(config.model))
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(step, {"step": np.int32(step), "params": nnx.to_pure_dict(nnx.state(model))}, {}, {"step": step}, {})
    ckpt.close()
    return workdir


def metric_rows(workdir) -> list[dict]:
    """The rows of a run's `tb/metrics.jsonl` (local or gs:// workdir)."""
    from ctelm_jax import fs

    return [json.loads(line) for line in (fs.as_path(workdir) / "tb" / "metrics.jsonl").read_text().splitlines()]


def sigterm_once_logged(workdir, step: int) -> threading.Thread:
    """Sends this process SIGTERM once the run's (local or gs://) metrics.jsonl holds `step` rows."""
    from ctelm_jax import fs

    path = fs.as_path(workdir) / "tb" / "metrics.jsonl"

    def watch():
        while not (path.exists() and len(path.read_text().splitlines()) >= step):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
