"""What a user sees: the main job's console (phase lines, no library INFO, no libtpu, no long lines) and its log file;
JAX's platforms chosen on import where the user set none."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctelm_jax
from ctelm_jax import console

REPO = Path(__file__).resolve().parents[1]
PHASES = ("embedding: 300 trials with all-MiniLM-L6-v2", "data: ", "stage 1/2 'align': steps 0..4",
          "stage 2/2 'multitask': steps 4..8", "estimate: ", "evaluation of step 8", "evaluation: describe (ELM) took",
          "explorer: ", "done in ", "  report ", "  explorer ", "  log ")


@pytest.mark.slow
def test_main_console_is_phase_lines_and_the_log_holds_the_rest(main_run):
    workdir, out = main_run
    lines = (out.stdout + out.stderr).splitlines()  # also splits tqdm's \\r-separated bar updates
    assert not [x for x in lines if re.match(r"[EF]\d{4} ", x) or "libtpu" in x or "TPU" in x], "libtpu's output"
    assert not [x for x in lines if len(x) > 200]
    assert not [x for x in lines if re.match(r"I\d{4} ", x)], "INFO lines on the console"
    for phase in PHASES:
        assert any(x.startswith(phase) for x in out.stdout.splitlines()), phase
    log = (workdir / console.LOG_FILE).read_text()
    assert "CheckpointManager" in log and "stage 1/2 'align'" in log  # orbax's INFO, and the phases for context
    assert "could not be restored" not in log + out.stderr  # evaluation reads only the parameters


def test_importing_ctelm_jax_keeps_libtpu_quiet():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", "import ctelm_jax, jax; print(jax.default_backend())"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "cpu" and out.stderr == "", out.stderr


@pytest.mark.parametrize("devices, plugin, platforms", [
    ((), False, "cpu"), (("/dev/accel0",), False, None), (("/dev/vfio/0",), False, None),
    (("/dev/nvidia0",), True, "cuda,cpu"), (("/dev/nvidiactl",), False, None), (("/dev/kfd",), False, None)])
def test_platforms_without_a_tpu(monkeypatch, devices, plugin, platforms):
    monkeypatch.setattr(ctelm_jax.glob, "glob", lambda p: [d for d in devices if d.startswith(p.rstrip("*[0-9]"))])
    monkeypatch.setattr(ctelm_jax.os.path, "exists", lambda p: p in devices)
    real = ctelm_jax.importlib.util.find_spec
    monkeypatch.setattr(ctelm_jax.importlib.util, "find_spec",
                        lambda name: plugin if name.startswith("jax_plugins") else real(name))
    assert ctelm_jax.default_platforms() == platforms


def test_the_estimate_leaves_out_the_compiling_step(capsys):
    estimate = console.Estimate(steps_left=104)
    for seconds in (30.0, 2.0, 2.5, 1.5):
        estimate.step(seconds)
    assert capsys.readouterr().out == ("estimate: 2.00 s a step, about 3 min for the 100 steps left (validation, saves "
                                       "and each stage's first step, which compiles, come on top)\n")
    estimate.step(2.0)
    assert capsys.readouterr().out == ""
