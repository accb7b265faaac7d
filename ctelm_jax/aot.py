"""The TPU compiler's memory and FLOPs for a config on a TPU slice, compiled ahead of time on a machine without one.

`python -m ctelm_jax.aot --config=configs/X.py --topology=v5p:2x2x1 [--find_batch] [--config.key=value ...]`

For the topology's compile-only devices (libtpu: `pip install -e '.[tpu]'`, which `make setup` does), this builds the
config's mesh and compiles, with abstract inputs (no weights), the training loop's own jitted step of each stage
(`train.stage_step`) and the decoding loop (`generate.decode_batch`, KV cache, the config's global batch,
DECODE_PROMPT_TOKENS + DECODE_NEW_TOKENS). Per device it prints the compiler's argument / output / alias / temporary
bytes against the device's HBM, the compiled FLOPs beside the analytic count, and the sizing tool's total
(`ctelm_jax.sizing`) with its ratio to the compiler's. `--find_batch` searches (by compiling) the largest global batch
at seq 512 whose every stage leaves at least 10% of HBM free.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, logging

from ctelm_jax import console, sizing
from ctelm_jax.errors import UserError
from ctelm_jax.generate import SamplingConfig, decode_batch
from ctelm_jax.models.llama import LlamaConfig
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import as_rules, batch_sharding
from ctelm_jax.run.build import decoder_config
from ctelm_jax.train.metrics import forward_flops_per_token, train_flops_per_token

GiB = 2**30
# HBM per chip by the device_kind libtpu reports: v4 32 GiB, v5e ("v5 lite") 16, v5p 95, v6e ("v6 lite") 32.
HBM_GIB_PER_CHIP = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
DECODE_PROMPT_TOKENS, DECODE_NEW_TOKENS = 128, 128
FIND_BATCH_SEQ_LEN, FIND_BATCH_HEADROOM = 512, 0.10


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's per-device numbers: the compiler's memory and FLOPs, the sizing tool's estimates."""

    name: str
    memory: dict[str, int]
    flops: float  # the compiler's cost analysis: a while loop's body (scanned layers, decode loop) counted once
    counted_flops: float  # the analytic count of what the compiler counts (loop bodies once)
    step_flops: float  # the analytic count of one whole call (every layer, every decode step)
    sizing_bytes: int
    compile_s: float


def topology_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology such as 'v5p:2x2x1' (no TPU needed, libtpu is)."""
    from jax.experimental import topologies

    # Compile-only: no chip is opened, so processes (test workers, a training job on a TPU VM) may share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise UserError("libtpu is not installed: run `pip install -e '.[tpu]'` (`make setup` does).") from e
        raise UserError(f"topology {topology!r}: {e}. Name a TPU slice as <generation>:<chips per axis>, e.g. "
                        "v5p:2x2x1, v5p:2x2x2, v5e:2x4, v6e:4x4.") from e


def hbm_bytes_per_device(devices: Sequence[jax.Device]) -> int:
    """HBM of one device: its chip's HBM over the devices (cores) per chip."""
    kind = devices[0].device_kind
    if kind not in HBM_GIB_PER_CHIP:
        raise UserError(f"no HBM size known for {kind!r}; add it to ctelm_jax.aot.HBM_GIB_PER_CHIP.")
    chips = len({tuple(d.coords) for d in devices})
    return HBM_GIB_PER_CHIP[kind] * GiB * chips // len(devices)


def counted_config(cfg: LlamaConfig) -> LlamaConfig:
    """The decoder as the compiler's cost analysis counts it: a scanned layer stack (a while loop) once."""
    return cfg.replace(num_layers=1) if cfg.scan_layers else cfg


def _timed_compile(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, float]:
    t = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


def train_programs(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                   stages: Sequence[int] | None = None) -> list[Program]:
    """Each (or the listed) stage's train step compiled for `devices` with the config's mesh and batch."""
    mesh = make_mesh(dict(config.mesh), devices)
    sized = sizing.size(config, len(devices))
    cfg, seq_len = decoder_config(config.model), int(config.data.seq_len)
    tokens_per_device = sized.global_batch * seq_len / len(devices)
    out = []
    for i in range(len(config.stages)) if stages is None else stages:
        compiled, seconds = _timed_compile(sizing.lower_train_step(config, i, mesh))
        stage = sized.stages[i]
        counted = train_flops_per_token(counted_config(cfg), seq_len, "decoder" in stage.trainable) * tokens_per_device
        out.append(Program(f"train {stage.name} ({'+'.join(stage.trainable)})", sizing.compiled_memory(compiled),
                           float(compiled.cost_analysis()["flops"]), counted, stage.flops_per_device_step,
                           stage.total_bytes, seconds))
    return out


def decode_program(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Program:
    """`generate.decode_batch` (greedy) compiled for `devices`: the config's global batch, DECODE_PROMPT_TOKENS prompt
    tokens, DECODE_NEW_TOKENS new ones. Analytic FLOPs: the prefill (the LM head at the last position only) and each
    decode step (one token against the whole cache buffer); the sizing tool's side: parameters, their fsdp-gathered
    and compute-dtype copies, and the KV cache."""
    mesh = make_mesh(dict(config.mesh), devices)
    rules = as_rules(config.rules)
    graphdef, params, _ = sizing.abstract_params(config, mesh)
    b, t, e = int(config.data.global_batch_size), DECODE_PROMPT_TOKENS, int(config.data.max_embeddings_per_row)

    def sds(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.ShapeDtypeStruct:  # a batch-sharded input
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, len(shape)))

    sampling = SamplingConfig(max_new_tokens=DECODE_NEW_TOKENS, batch_size=b)
    lowered = decode_batch.lower(graphdef, sampling, params, sds((b, t), jnp.int32), sds((b, t), jnp.int32),
                                 sds((b, e, int(config.model.domain_dim)), jnp.float32), sds((b,), jnp.bool_),
                                 jax.eval_shape(lambda: jax.random.key(0)))
    compiled, seconds = _timed_compile(lowered)
    cfg = decoder_config(config.model)
    n, length = len(devices), t + DECODE_NEW_TOKENS

    def prefill(c: LlamaConfig) -> float:
        lm_head = 2 * c.hidden_size * c.vocab_size
        return b * (t * (forward_flops_per_token(c, t) - lm_head) + lm_head)

    def step(c: LlamaConfig) -> float:  # forward_flops_per_token counts causal halves: 2 * length is the whole buffer
        return b * forward_flops_per_token(c, 2 * length)

    counted = prefill(counted_config(cfg)) + step(counted_config(cfg))
    whole = prefill(cfg) + (DECODE_NEW_TOKENS - 1) * step(cfg)
    sized = sizing.size(config, n)
    held = sized.param_bytes + sized.gathered_weight_bytes + sized.cast_copy_bytes
    return Program(f"decode {b} x {t}+{DECODE_NEW_TOKENS}", sizing.compiled_memory(compiled),
                   float(compiled.cost_analysis()["flops"]), counted / n, whole / n,
                   held + sizing.kv_cache_bytes(cfg, b, length, sized.mesh), seconds)


def out_of_memory(error: Exception) -> bool:
    """Whether a compile failed because the program does not fit in HBM (the TPU compiler refuses such programs)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def fits(program: Program, hbm: int, headroom: float = FIND_BATCH_HEADROOM) -> bool:
    """Whether the program's peak leaves at least `headroom` of HBM free."""
    return program.memory["peak"] <= (1.0 - headroom) * hbm


def find_batch(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> int:
    """The largest global batch (a multiple of the batch-sharded devices) at FIND_BATCH_SEQ_LEN whose every stage's
    compiled peak leaves FIND_BATCH_HEADROOM of HBM; searched from the sizing tool's guess by compiling. 0: none."""
    config = config.copy_and_resolve_references()
    config.data.seq_len = FIND_BATCH_SEQ_LEN
    hbm = hbm_bytes_per_device(devices)
    sized = sizing.size(config, len(devices))
    rows = sized.mesh["data"] * sized.mesh["fsdp"]  # the devices a batch is split over
    order = sorted(range(len(config.stages)), key=lambda i: -sized.stages[i].total_bytes)  # likeliest to fail first

    def ok(per_device: int) -> bool:
        config.data.global_batch_size = per_device * rows
        try:
            fit = all(fits(train_programs(config, devices, [i])[0], hbm) for i in order)
        except jax.errors.JaxRuntimeError as e:
            if not out_of_memory(e):
                raise
            fit = False
        logging.info("global batch %d x %d: %s", per_device * rows, FIND_BATCH_SEQ_LEN, "fits" if fit else "does not fit")
        return fit

    try:
        guess = sizing.recommend(config, hbm, len(devices), margin=FIND_BATCH_HEADROOM).per_device_batch
    except ValueError:  # the tool finds no batch that fits: let the compiler say
        guess = 1
    lo, hi = 0, None  # the largest per-device batch known to fit (0: none yet), the smallest known not to
    k, step = guess, max(1, guess // 8)
    while hi is None or hi - lo > 1:
        lo, hi = (k, hi) if ok(k) else (lo, k)
        if hi is None:  # gallop up from the guess
            k, step = lo + step, 2 * step
        elif lo == 0:  # gallop down from the guess
            k, step = max(1, hi - step), 2 * step
        else:
            k = (lo + hi) // 2
    return lo * rows


def format_programs(programs: Sequence[Program], hbm: int, topology: str, devices: Sequence[jax.Device]) -> str:
    """A table per device: the compiler's memory against HBM with the sizing tool's total beside it; the compiler's
    FLOPs beside the analytic count of the same (loop bodies once) and of the whole call."""
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    tflop = lambda f: f"{f / 1e12:.4g}"  # noqa: E731
    head = (f"{topology}: {len(devices)} x {devices[0].device_kind}, {hbm / GiB:.0f} GiB HBM per device. Per device: "
            "the TPU compiler's bytes (GiB), the sizing tool's total (ctelm_jax.sizing), and TFLOP: the compiler's "
            "(a while loop's body counted once: scanned layers, the decode loop), the analytic count of the same, "
            "and of the whole call")
    cols = ("program", "argument", "output", "alias", "temp", "total", "of HBM", "sizing", "sizing/TPU",
            "TFLOP TPU", "analytic", "whole call", "compile s")
    rows = [(p.name, gib(p.memory["argument"]), gib(p.memory["output"]), gib(p.memory["alias"]), gib(p.memory["temp"]),
             gib(p.memory["peak"]), f"{p.memory['peak'] / hbm:.0%}", gib(p.sizing_bytes),
             f"{p.sizing_bytes / p.memory['peak']:.2f}", tflop(p.flops), tflop(p.counted_flops), tflop(p.step_flops),
             f"{p.compile_s:.0f}") for p in programs]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(row: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([head, line(cols), "-" * len(line(cols))] + [line(r) for r in rows])


def main(argv: list[str]) -> None:
    """Compiles the config's programs for --topology and prints the table (and --find_batch's answer)."""
    del argv
    jax.config.update("jax_platforms", "cpu")  # compile only: never claim this machine's accelerators
    # A compile-only device's executable cannot be loaded back (no TPU client): keep them out of a persistent cache
    # the user set (JAX_COMPILATION_CACHE_DIR), where a second run would find them and warn.
    jax.config.update("jax_enable_compilation_cache", False)
    config = _CONFIG.value
    try:
        devices = topology_devices(_TOPOLOGY.value)
        hbm = hbm_bytes_per_device(devices)
        programs = train_programs(config, devices) + [decode_program(config, devices)]
        print(format_programs(programs, hbm, _TOPOLOGY.value, devices))
        if _FIND_BATCH.value:
            best = find_batch(config, devices)
            print(f"\nlargest global batch at seq {FIND_BATCH_SEQ_LEN} leaving {FIND_BATCH_HEADROOM:.0%} of HBM free "
                  f"on {_TOPOLOGY.value}: {best}" + ("" if best else " (none: shard more, use remat)"))
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        raise UserError(f"a program does not fit in HBM on {_TOPOLOGY.value}: {str(e).splitlines()[0]}. Lower "
                        "--config.data.global_batch_size (--find_batch finds the largest), shard over more chips, or "
                        "use remat.") from e


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to compile.")
    _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:2x2x1 (v5p-8), v5p:2x2x2, v5e:2x4.")
    _FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Also search the largest global batch that fits (compiles).")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(console.entry_point(main, "ctelm_jax.aot", also=(ValueError,)))
