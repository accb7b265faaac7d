"""The sizing tool: its per-device totals against XLA's compiled train step, its parts against exact counts, and the
Llama-3.1-8B configs against its own recommendation."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import default, llama31_8b_full_v5p, llama31_8b_h100x8, llama31_8b_v5p8, tiny
from ctelm_jax import sizing
from ctelm_jax.models.llama import init_cache
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import as_rules
from ctelm_jax.run.build import decoder_config
from ctelm_jax.train.metrics import train_flops_per_token

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30

# (config module, mesh (data, fsdp, tensor), overrides "section.key": value, stage indices, or "decoder": a stage
# that fine-tunes adapter + decoder). The 8B cases run in float32 at a small batch (see the docstring below).
XLA_CASES = [
    pytest.param(tiny, (1, 1, 1), {}, (0, 1), id="tiny-1dev"),
    pytest.param(tiny, (2, 2, 2), {}, (0, 1), id="tiny-data2-fsdp2-tensor2"),
    pytest.param(tiny, (1, 1, 1), {"model.loss_chunk": 16}, (0, 1), id="tiny-1dev-loss_chunk16"),
    pytest.param(tiny, (2, 2, 2), {"model.loss_chunk": 16}, (0, 1), id="tiny-data2-fsdp2-tensor2-loss_chunk16"),
    pytest.param(default, (1, 1, 1), {}, (1,), id="smollm2-1dev-lora", marks=pytest.mark.slow),
    pytest.param(default, (2, 2, 2), {"model.scan_layers": True, "model.remat_policy": "dots_no_batch"}, (1,),
                 id="smollm2-2x2x2-scan-dots_no_batch-lora", marks=pytest.mark.slow),
    pytest.param(default, (1, 4, 2), {"model.scan_layers": True, "model.remat_policy": "full"}, "decoder",
                 id="smollm2-fsdp4-tensor2-scan-full-decoder", marks=pytest.mark.slow),
    pytest.param(llama31_8b_v5p8, (1, 4, 1), {"model.dtype": "float32", "data.global_batch_size": 4}, (1,),
                 id="llama31_8b-fsdp4-f32-lora", marks=pytest.mark.slow),
    pytest.param(llama31_8b_v5p8, (1, 2, 2), {"model.dtype": "float32", "data.global_batch_size": 2}, (1,),
                 id="llama31_8b-fsdp2-tensor2-f32-lora", marks=pytest.mark.slow),
]


def configured(module, mesh, overrides):
    c = module.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.mark.parametrize("module,mesh,overrides,stages", XLA_CASES)
def test_total_within_20_percent_of_xla(module, mesh, overrides, stages):
    """Tool total vs XLA's peak for the compiled train step, per device, on XLA:CPU.

    XLA's side: `compiled.memory_analysis()` of `train.step.make_train_step` jitted as the loop does (state donated,
    abstract sharded inputs): argument + output - alias + temp. With the state donated, output - alias is only the
    metrics, so this is what the device holds at the step's peak: parameters, optimizer state, batch, and XLA's
    temporaries (gradients, saved activations, logits work, all-gathered weights). The tool's side is its
    `total_bytes` of the same stage (its whole model: `ctelm_jax.sizing`'s docstring).
    Also checks the persistent part alone: parameters + optimizer state + batch against XLA's argument size.
    Float32 compute only (the Llama-3.1-8B configs too, at a small batch): XLA:CPU upcasts bfloat16 arithmetic to
    float32 and keeps both copies, which says nothing about TPU/GPU. Layer remat is checked with scan_layers, since
    XLA:CPU schedules the recomputation of unrolled remat layers early and so keeps their activations anyway.
    """
    config = configured(module, mesh, overrides)
    if stages == "decoder":
        config.stages = [dict(config.stages[0], name="full", trainable=("adapter", "decoder"))]
        stages = (0,)
    n = math.prod(mesh)
    sized = sizing.size(config, n)
    device_mesh = make_mesh(dict(config.mesh), jax.devices()[:n])
    for i in stages:
        xla = sizing.xla_train_memory(config, i, device_mesh)
        stage = sized.stages[i]
        persistent = sized.param_bytes + stage.optimizer_bytes + sized.batch_bytes
        assert persistent == pytest.approx(xla["argument"], rel=0.02), (stage.name, persistent, xla)
        ratio = stage.total_bytes / xla["peak"]
        print(f"{config.stages[i]['name']} mesh={mesh} {overrides}: tool {stage.total_bytes / 2**20:.1f} MiB, "
              f"XLA {xla['peak'] / 2**20:.1f} MiB, ratio {ratio:.3f}")
        assert 0.8 <= ratio <= 1.2, (stage, xla)


def test_parameters_optimizer_and_flops_are_exact():
    """On one device the parameter bytes are the model's, Adam holds two moments per trainable scalar."""
    config = tiny.get_config()
    sized = sizing.size(config, 1)
    table = sizing.param_table(config.model, sized.mesh, as_rules(config.rules))
    state = nnx.state(sizing.abstract_elm(config.model))
    leaves = jax.tree.leaves(state)
    assert sized.num_params == sum(x.size for x in leaves)
    assert sized.param_bytes == sum(x.size * x.dtype.itemsize for x in leaves)
    lora = sum(math.prod(x.shape) for x in table if x.group == "lora")
    adapter = sum(math.prod(x.shape) for x in table if x.group == "adapter")
    align, multitask = sized.stages
    assert align.trainable_params == adapter and multitask.trainable_params == adapter + lora
    assert multitask.optimizer_bytes == 2 * multitask.gradient_bytes == 2 * 4 * (adapter + lora)
    cfg = decoder_config(config.model)
    tokens = config.data.global_batch_size * config.data.seq_len
    assert align.flops_per_step == train_flops_per_token(cfg, config.data.seq_len, False) * tokens


def test_k_soft_tokens_per_embedding_widen_the_adapter_output():
    config = tiny.get_config()
    one = sizing.size(config, 1).num_params
    config.model.tokens_per_embedding = 3
    m = config.model
    # fc_out: (adapter_hidden + 1 bias row) x k * hidden_size, two more tokens' worth
    assert sizing.size(config, 1).num_params - one == 2 * (m.adapter_hidden + 1) * m.arch.hidden_size


def test_sharded_bytes_divide_over_the_mesh():
    """fsdp x tensor split every large matrix; the adapter's hidden axis goes over tensor only."""
    config = tiny.get_config()
    one = {x.path: x for x in sizing.param_table(config.model, dict(data=1, fsdp=1, tensor=1),
                                                 as_rules(config.rules))}
    four = {x.path: x for x in sizing.param_table(config.model, dict(data=2, fsdp=2, tensor=2),
                                                  as_rules(config.rules))}
    embed = ("decoder", "embed_tokens")
    assert four[embed].device_bytes * 4 == one[embed].device_bytes
    assert four[embed].gathered_bytes * 2 == one[embed].gathered_bytes
    fc_in = ("adapter", "fc_in", "kernel")
    assert four[fc_in].device_bytes * 2 == one[fc_in].device_bytes


def test_kv_cache_matches_init_cache():
    """The decoding cache estimate is init_cache's k + v, split over rows and kv heads."""
    config = tiny.get_config()
    cfg = decoder_config(config.model)
    cache = jax.eval_shape(lambda: init_cache(cfg, 8, 64, jnp.dtype(cfg.dtype)))
    exact = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache["k"], cache["v"])))
    assert sizing.kv_cache_bytes(cfg, 8, 64, dict(data=1, fsdp=1, tensor=1)) == exact
    assert sizing.kv_cache_bytes(cfg, 8, 64, dict(data=2, fsdp=2, tensor=2)) == exact // 8


def test_recommend_is_the_largest_batch_under_the_margin():
    config = tiny.get_config()
    budget = 0.5 * GiB
    best = sizing.recommend(config, budget, 8)
    assert best.peak_bytes <= 0.85 * budget
    assert sizing.size(config, 8, per_device_batch=best.per_device_batch + 1).peak_bytes > 0.85 * budget
    with pytest.raises(ValueError, match="per-device batch of 1"):
        sizing.recommend(config, 1e6, 8)


# rows below the tool's recommendation (v5p-8's batch is also the TPU compiler's: `ctelm_jax.aot`, BENCHMARKS.md).
@pytest.mark.parametrize("module,devices,memory,rows_below", [(llama31_8b_v5p8, 4, 95 * GiB, 0),
                                                              (llama31_8b_h100x8, 8, 80e9, 0)])
def test_llama31_8b_configs_use_the_recommended_batch(module, devices, memory, rows_below):
    """Llama-3.1-8B (8.03B) + adapter + LoRA; the configured batch is the tool's largest under 85% of memory, or the
    TPU compiler's where it was measured."""
    config = module.get_config()
    sized = sizing.size(config, devices)
    assert 8.03e9 < sized.num_params - sized.stages[-1].trainable_params < 8.04e9
    assert sized.per_device_batch == sizing.recommend(config, memory, devices).per_device_batch - rows_below
    assert sized.global_batch == config.data.global_batch_size
    assert sized.peak_bytes <= 0.85 * memory


def test_lora_mesh_replicates_a_bf16_base_where_it_fits():
    """Llama-3.1-8B LoRA recipe on 4 devices: with the frozen base in bf16 (2 bytes a weight, no compute-dtype copy)
    data parallelism over a replicated base is recommended exactly when its batch-1 peak fits under 85% of memory."""
    config = llama31_8b_v5p8.get_config()
    config.model.frozen_dtype = "bfloat16"
    sized = sizing.size(config, 4)
    base = [x for x in sizing.param_table(config.model, sized.mesh, as_rules(config.rules), config.stages)
            if x.group == "decoder"]
    assert {x.dtype for x in base} == {"bfloat16"} and sized.cast_copy_bytes == 0
    assert 2 * 8.03e9 / 4 < sum(x.device_bytes for x in base) < 2 * 8.04e9 / 4  # fsdp=4 in the config
    replicated, fsdp = dict(data=4, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=1)
    one_row = config.copy_and_resolve_references()
    one_row.mesh.data, one_row.mesh.fsdp = 4, 1
    peak = sizing.size(one_row, 4, per_device_batch=1).peak_bytes
    assert sizing.recommend_mesh(config, 1.01 * peak / 0.85, 4)[0] == replicated
    assert sizing.recommend_mesh(config, 0.99 * peak / 0.85, 4)[0] == fsdp
    assert sizing.recommend_mesh(config, 95 * GiB, 4)[0] == replicated  # v5p
    assert sizing.recommend_mesh(config, 16 * GiB, 4)[0] == fsdp  # v5e
    config.model.frozen_dtype = "float32"  # 30 GiB of replicated f32 weights + their bf16 copies do not fit in 40
    assert sizing.recommend_mesh(config, 40 * GiB, 4)[0] == fsdp
    assert sizing.recommend_mesh(llama31_8b_full_v5p.get_config(), 95 * GiB, 4)[0] == fsdp  # trains the decoder


def test_cli_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "ctelm_jax.sizing", "--config=configs/tiny.py", "--num_devices=8", "--memory_gib=1",
         "--config.mesh.fsdp=2"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "total per device (GiB)" in out.stdout and "'fsdp': 2" in out.stdout
    assert "recommended for 1 GiB per device" in out.stdout
    assert "recommended mesh: --config.mesh.data=8 --config.mesh.fsdp=1 --config.mesh.tensor=1" in out.stdout
