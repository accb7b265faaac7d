"""`make setup` picks JAX's backend from what `nvidia-smi` reports (a fake one on PATH here); JAX_BACKEND overrides."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMI = """#!/bin/sh
if [ "$1" = -L ]; then {listing}; exit 0; fi
echo "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: {cuda}     |"
"""


def env_with_smi(tmp_path: Path, cuda: str | None, gpus: int = 1) -> dict:
    """The environment with a fake `nvidia-smi` (None: a failing one, as on a machine without a driver) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    listing = "; ".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"' for i in range(gpus)) or "true"
    smi.write_text(SMI.format(listing=listing, cuda=cuda) if cuda else "#!/bin/sh\necho 'NVIDIA-SMI has failed'; exit 9\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "JAX_BACKEND"}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


def setup_commands(env: dict, tmp_path: Path, *args: str) -> str:
    """What `make setup` would run into a fresh venv (`make -n`)."""
    out = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("cuda, gpus, backend", [
    ("12.4", 1, "cuda12"), ("13.0", 8, "cuda13"), ("11.8", 1, "cpu"), ("12.4", 0, "cpu"), (None, 1, "cpu")])
def test_backend_follows_nvidia_smi(tmp_path, cuda, gpus, backend):
    env = env_with_smi(tmp_path, cuda, gpus)
    picked = subprocess.run([str(REPO / "tools" / "jax_backend.sh")], env=env, capture_output=True, text=True)
    assert picked.stdout.strip() == backend
    commands = setup_commands(env, tmp_path)
    [install] = [line for line in commands.splitlines() if "pip install -q -e" in line]
    assert install.endswith(f"'jax[{backend}]'") if backend != "cpu" else "jax[" not in install
    assert f"setup: JAX for {backend}" in commands


def test_backend_variable_overrides_and_is_checked(tmp_path):
    env = env_with_smi(tmp_path, "12.4")
    assert "jax[" not in setup_commands(env, tmp_path, "JAX_BACKEND=cpu")
    assert "'jax[cuda13]'" in setup_commands(env, tmp_path, "JAX_BACKEND=cuda13")
    bad = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", "JAX_BACKEND=rocm"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "JAX_BACKEND=rocm: use cpu, cuda12 or cuda13" in bad.stderr


def test_run_needs_no_root(tmp_path):
    assert "apt-get" not in setup_commands(env_with_smi(tmp_path, None), tmp_path, "run")
