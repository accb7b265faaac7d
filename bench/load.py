"""Peak host memory of loading a 1B-class pretrained decoder onto 8 devices: the old read-everything path against
`build_elm`'s sharded one.

    .venv/bin/python bench/load.py [--dir=/tmp/ctelm_load_bench] [--keep]

Writes a random bfloat16 checkpoint of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, vocabulary
128256, tied embeddings; 2.5 GB in 3 safetensors shards with an index) and loads it as the decoder of an ELM
(param_dtype bfloat16, LoRA rank 16, fresh adapter) onto a mesh fsdp=8 of 8 fake CPU devices, each path in a fresh
subprocess:

  old  what `build_elm` + `train/loop.py` did before: an eager host model, `read_tensors` (every tensor in memory),
       `decoder_from_hf`, then `jax.device_put` of the whole parameter tree onto its shardings;
  new  `build_elm(mesh=...)`: fresh parameters from one jitted initialiser, decoder read slice by slice per device.

Each subprocess reports its resident memory once set up (JAX, devices, tokenizer: the baseline), then resets the
kernel's high-water mark (`/proc/self/clear_refs`) and loads; peak = VmHWM after loading. On fake CPU devices the
device arrays live in host memory too, so they are reported apart: overhead = peak - baseline - device bytes is what a
host with real accelerators would hold at most on top of its baseline. The checkpoint is deleted at the end unless
--keep.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/ctelm_load_bench", "Where the checkpoint is written (and deleted after).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoint (reused by the next run).")
_LOAD = flags.DEFINE_enum("load", None, ["old", "new"], "Internal: load with this path in this process and print JSON.")

ARCH = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
            rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072)
LAYERS_PER_SHARD = 8
GIB = 2**30


def layer_shapes(i: int) -> dict[str, tuple[int, int]]:
    """HF (out, in) shapes of layer i's tensors."""
    d, f = ARCH["hidden_size"], ARCH["intermediate_size"]
    kv = ARCH["num_kv_heads"] * d // ARCH["num_heads"]
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}


def write_checkpoint(folder: Path) -> None:
    """A random bfloat16 checkpoint folder (config.json, shards, index), one shard in memory at a time."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from ctelm_jax.models.llama import LlamaConfig
    from ctelm_jax.weights.hf import INDEX_FILE

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    groups = [{"model.embed_tokens.weight": (ARCH["vocab_size"], ARCH["hidden_size"]),
               "model.norm.weight": (ARCH["hidden_size"],)}]
    for start in range(0, ARCH["num_layers"], LAYERS_PER_SHARD):
        groups.append({k: v for i in range(start, start + LAYERS_PER_SHARD) for k, v in layer_shapes(i).items()})
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: (0.02 * rng.standard_normal(s, np.float32)).astype(ml_dtypes.bfloat16) for k, s in group.items()}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        total += sum(a.nbytes for a in shard.values())
        weight_map.update({k: name for k in group})
        del shard
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(LlamaConfig(**ARCH, param_dtype="bfloat16").to_hf_dict()))


def memory_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process (KiB)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(line.split()[1]) for line in lines for k in ("VmRSS", "VmHWM") if line.startswith(k + ":")}


def load(path: str, folder: Path) -> dict[str, float]:
    """Loads the checkpoint with one path in this process; memory and time figures."""
    import jax
    from flax import nnx

    from configs.base import base_config
    from ctelm_jax.models.adapter import Adapter
    from ctelm_jax.run.build import build_elm, decoder_config, load_tokenizer
    from ctelm_jax.models.elm import ELM
    from ctelm_jax.models.llama import Llama
    from ctelm_jax.parallel.mesh import make_mesh
    from ctelm_jax.parallel.rules import DEFAULT_RULES, state_shardings
    from ctelm_jax.weights.hf import decoder_from_hf, read_tensors

    model_cfg = base_config().model
    model_cfg.update(decoder=str(folder), tokenizer="default", dtype="bfloat16", param_dtype="bfloat16")
    tokenizer = load_tokenizer(model_cfg)
    mesh = make_mesh({"fsdp": 8})
    baseline = memory_kib()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    if path == "new":
        params = nnx.to_pure_dict(nnx.state(build_elm(model_cfg, tokenizer, mesh=mesh, rules=DEFAULT_RULES)))
    else:
        cfg = decoder_config(model_cfg)
        rngs = nnx.Rngs(int(model_cfg.seed))
        decoder = Llama(cfg, rngs=rngs)
        decoder_from_hf(decoder, read_tensors(folder), source=str(folder))
        adapter = Adapter(int(model_cfg.domain_dim), int(model_cfg.adapter_hidden), cfg.hidden_size, rngs=rngs,
                          param_dtype=jax.numpy.bfloat16, dtype=jax.numpy.bfloat16)
        _, state = nnx.split(ELM(decoder, adapter, tokenizer.placeholder_id))
        del decoder, adapter
        params = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh, DEFAULT_RULES)))
        del state
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    after = memory_kib()
    device = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
    return {"path": path, "seconds": round(seconds, 1), "baseline_gib": baseline / 2**20,
            "peak_gib": after["VmHWM"] / 2**20, "device_gib": device / GIB}


def main(argv: Sequence[str]) -> None:
    """Writes the checkpoint if needed, runs both loads in subprocesses, prints the table."""
    del argv
    from ctelm_jax.weights.hf import SafetensorsFolder

    folder = Path(_DIR.value)
    if _LOAD.value:
        print(json.dumps(load(_LOAD.value, folder)))
        return
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(folder)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / GIB
    largest = max(math.prod(s) for s in SafetensorsFolder(folder).shapes.values()) * 2 / GIB  # bfloat16
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    print(f"checkpoint: {size:.2f} GiB in {len(files)} shards, largest tensor {largest:.2f} GiB; "
          f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print("| path | load s | baseline RSS GiB | peak RSS GiB | device arrays GiB | peak - baseline - device GiB |")
    print("|---|---|---|---|---|---|")
    try:
        for path in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, f"--load={path}", f"--dir={folder}"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            overhead = r["peak_gib"] - r["baseline_gib"] - r["device_gib"]
            print(f"| {path} | {r['seconds']} | {r['baseline_gib']:.2f} | {r['peak_gib']:.2f} | {r['device_gib']:.2f} "
                  f"| {overhead:.2f} |", flush=True)
    finally:
        if not _KEEP.value:
            shutil.rmtree(folder)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root
    app.run(main)
