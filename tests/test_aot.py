"""The ahead-of-time TPU compile (`ctelm_jax.aot`) of a tiny config for a v5p-8 (2x2x1) topology, without a TPU:
the TPU compiler's memory analysis and FLOPs of the training loop's step, and the CLI's table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import tiny
from ctelm_jax import aot, sizing
from ctelm_jax.errors import UserError
from ctelm_jax.parallel.mesh import make_mesh

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5p:2x2x1"


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices(TOPOLOGY)


def test_topology_is_a_v5p_8(devices):
    """v5p:2x2x1 is 4 chips, one device each, 95 GiB of HBM per chip."""
    assert len(devices) == 4 and devices[0].device_kind == "TPU v5"
    assert aot.hbm_bytes_per_device(devices) == 95 * 2**30


def test_train_steps_compile_with_memory_and_the_analytic_flops(devices):
    """Every stage of the tiny config compiles for the TPU with positive argument / output / temp bytes, and the
    compiled FLOPs per device are the analytic count (`train.metrics.train_flops_per_token`) plus at most 10%.

    The analytic count has every matmul; the compiler adds elementwise work. Here 97% of the matmul FLOPs are the
    tied LM head (2 * 64 * 49152 per token forward), so the addition is mostly the log-softmax over the vocabulary and
    its gradient: ~15 FLOPs per logit against the head's 256 (forward and input gradient), ~6% (measured: 1.058).
    Attention scores, which the analytic count takes as causal halves, are 0.3% of the total.
    """
    programs = aot.train_programs(tiny.get_config(), devices)
    assert [p.name.split()[1] for p in programs] == ["align", "multitask"]
    for p in programs:
        assert min(p.memory["argument"], p.memory["output"], p.memory["temp"]) > 0, p
        assert p.memory["peak"] < aot.hbm_bytes_per_device(devices)
        assert p.counted_flops == p.step_flops  # no scanned layers: the compiler counts every layer
        assert 1.0 <= p.flops / p.counted_flops <= 1.10, p


def test_train_step_compiles_with_the_splash_kernel(devices):
    """On TPU the default attention ('auto') is splash: the tiny config's train step at seq 320 (padded to 384, three
    tiles of 128, so the kernel's cross-tile softmax and causal block skipping are compiled) compiles for the v5p with
    splash attention's Pallas kernels as TPU custom calls: the forward (saving its residuals for the backward) and
    both backward kernels (dq, dk / dv), with segment ids."""
    config = tiny.get_config()
    config.data.seq_len = 320
    assert config.model.attention == "auto"
    text = sizing.lower_train_step(config, 0, make_mesh(dict(config.mesh), devices)).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    for kernel in ("splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
        assert kernel in text, kernel


def test_unknown_topology_names_the_fix():
    with pytest.raises(UserError, match="v5p:2x2x1"):
        aot.topology_devices("v5p:3x3x3x3")


def test_cli_prints_the_table(tmp_path):
    """The CLI's table has every program; it writes nothing to the user's persistent compilation cache, whose
    entries for compile-only devices could not be loaded back."""
    cache = tmp_path / "jax_cache"
    out = subprocess.run(
        [sys.executable, "-m", "ctelm_jax.aot", "--config=configs/tiny.py", f"--topology={TOPOLOGY}",
         "--config.data.global_batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (cache.exists() and any(cache.iterdir())), sorted(p.name for p in cache.iterdir())
    assert "4 x TPU v5, 95 GiB HBM per device" in out.stdout
    for row in ("train align (adapter)", "train multitask (adapter+lora)", "decode 4 x 128+128"):
        assert row in out.stdout, out.stdout
