"""Per-device memory and FLOPs of a config's train step on a mesh, without devices or weights; batch recommendation.

`python -m ctelm_jax.sizing --config=configs/X.py [--num_devices=8] [--memory_gib=80] [--xla] [--config.mesh.fsdp=8]`

The model of one step's peak (per device, bytes):
  parameters         every decoder + adapter parameter, sharded by its logical axes (`parallel.rules`)
  optimizer          AdamW mu + nu of the stage's trainable groups (adapter / lora / decoder), sharded like them
  gradients          one gradient per trainable parameter, sharded like it
  batch              the step's input arrays (this device's rows)
  saved activations  what the backward pass keeps of each layer, by remat policy (see `saved_bytes_per_token`)
  transient          the larger of the loss's logits work (XLA keeps 3 f32 (B, T, V/tensor) buffers when the program
                     is partitioned, 2 on one device: the logits and their gradient; with `model.loss_chunk`,
                     (B, loss_chunk, V/tensor) ones) and
                     one layer's backward (its activations, recomputed under remat)
  gathered weights   fsdp > 1: the LM head all-gathered over fsdp (and the embedding table when tensor > 1 too:
                     XLA replicates a table split on both axes for the lookup) and layer weights (one layer with
                     scan_layers; all layers without, as XLA hoists the all-gathers of unrolled layers)
  cast copies        the decoder's weights stored in another dtype than the compute dtype (param_dtype, or frozen_dtype
                     for groups no stage trains), copied into it (conservative: TPU may fuse it)
`tests/test_sizing.py` checks the total against XLA's compiled memory analysis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from ctelm_jax import console
from ctelm_jax.data.pipeline import batch_spec
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Constrain, LlamaConfig, no_constraint
from ctelm_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from ctelm_jax.parallel.rules import Rules, as_rules, batch_sharding, constrainer, logical_to_spec, state_shardings
from ctelm_jax.run.build import ModelSpec, decoder_config, tokens_per_embedding
from ctelm_jax.run.checkpoint import abstract_like
from ctelm_jax.train.curriculum import Curriculum
from ctelm_jax.train.metrics import train_flops_per_token
from ctelm_jax.train.optimizer import GROUPS, group_of
from ctelm_jax.train.precision import cast_frozen, frozen_dtype, frozen_groups
from ctelm_jax.train.stage_step import stage_step

GiB = 2**30
BATCH_INT_FIELDS = 6  # tokens, targets, loss_mask, segment_ids, positions, task_ids: 4 bytes per token each
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj")
MLP_IN_TARGETS = ("gate_proj", "up_proj")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter: where it is, its group, its bytes per device (sharded) and after an fsdp all-gather."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    group: str
    device_bytes: int
    gathered_bytes: int


@dataclasses.dataclass(frozen=True)
class StageSizing:
    """Per-device bytes and FLOPs of one curriculum stage's train step."""

    name: str
    trainable: tuple[str, ...]
    trainable_params: int
    optimizer_bytes: int
    gradient_bytes: int
    saved_activation_bytes: int
    transient_bytes: int
    total_bytes: int
    flops_per_step: float
    flops_per_device_step: float


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The sizing of a config on a mesh: stage-independent parts, each stage, and the decoding KV cache."""

    mesh: dict[str, int]
    num_devices: int
    per_device_batch: int
    global_batch: int
    seq_len: int
    num_params: int
    param_bytes: int
    batch_bytes: int
    gathered_weight_bytes: int
    cast_copy_bytes: int
    kv_cache_bytes: int
    stages: tuple[StageSizing, ...]

    @property
    def peak_bytes(self) -> int:
        """The largest stage total: what a device must hold."""
        return max(s.total_bytes for s in self.stages)


def abstract_elm(model_cfg: Mapping[str, Any], constrain: Constrain = no_constraint) -> ELM:
    """The ELM with ShapeDtypeStruct leaves (nothing allocated, no weights read)."""
    spec = ModelSpec(decoder_config(model_cfg), int(model_cfg["domain_dim"]), int(model_cfg["adapter_hidden"]), 0, 0,
                     False, float(model_cfg.get("embed_pred_weight", 0.0)), tokens_per_embedding(model_cfg))
    return nnx.eval_shape(lambda: spec.create(constrain))


def _shard_bytes(shape: Sequence[int], itemsize: int, spec: PartitionSpec, mesh_shape: Mapping[str, int],
                 skip: str | None = None) -> int:
    """Bytes of the largest shard of an array with this spec (uneven splits round up, as XLA pads)."""
    total = itemsize
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        total *= math.ceil(dim / math.prod(mesh_shape[a] for a in axes if a != skip))
    return total


def param_table(model_cfg: Mapping[str, Any], mesh_shape: Mapping[str, int], rules: Rules,
                stages: Sequence[Mapping[str, Any]] = ()) -> list[ParamInfo]:
    """Every parameter of the ELM with its per-device bytes under the logical rules on a mesh of this shape; with the
    curriculum's `stages`, the groups none of them trains are held in `model.frozen_dtype` (`train.precision`)."""
    model_json = json.dumps(dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg), sort_keys=True)
    frozen = tuple(sorted(frozen_groups(stages))) if stages else ()
    return list(_param_table(model_json, tuple(mesh_shape[a] for a in MESH_AXES), rules, frozen))


@functools.lru_cache(maxsize=16)
def _param_table(model_json: str, mesh_sizes: tuple[int, ...], rules: Rules,
                 frozen: tuple[str, ...]) -> tuple[ParamInfo, ...]:
    """`param_table` on a hashable key (recommend sizes one model many times)."""
    mesh_shape = dict(zip(MESH_AXES, mesh_sizes))
    mesh = AbstractMesh(mesh_sizes, MESH_AXES)
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    _, state = nnx.split(abstract_elm(model_cfg))
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        spec = logical_to_spec(var.get_metadata().get("out_sharding"), rules, mesh)
        keys = tuple(str(p) for p in path)
        dtype = frozen_dtype(model_cfg) if group_of(keys) in frozen else jnp.dtype(value.dtype)
        itemsize = dtype.itemsize
        out.append(ParamInfo(keys, tuple(value.shape), str(dtype), group_of(keys),
                             _shard_bytes(value.shape, itemsize, spec, mesh_shape),
                             _shard_bytes(value.shape, itemsize, spec, mesh_shape, skip="fsdp")))
    return tuple(out)


def saved_bytes_per_token(cfg: LlamaConfig, trainable: Sequence[str], seq_len: int, tensor: int) -> int:
    """Bytes one layer keeps per token for its backward pass (per device, heads / mlp split over `tensor`).

    remat 'none' keeps (measured on XLA): 2 residual-width tensors, q, k, v, 5 SwiGLU intermediates, the attention
    probabilities (f32 and compute dtype) and per-token norms; plus the inputs of trainable matmuls (LoRA factors or
    decoder weights) and each LoRA's x @ A. 'full' keeps the layer input; 'dots' the matmul outputs;
    'dots_no_batch' those without the attention score / value products.
    """
    c = jnp.dtype(cfg.dtype).itemsize
    d, f = cfg.hidden_size, math.ceil(cfg.intermediate_size / tensor)
    q = math.ceil(cfg.num_heads / tensor) * cfg.head_dim
    kv = math.ceil(cfg.num_kv_heads / tensor) * cfg.head_dim
    scores = math.ceil(cfg.num_heads / tensor) * seq_len
    lora = cfg.lora_targets if (cfg.lora_rank and "lora" in trainable) else ()
    weights = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") if "decoder" in trainable \
        else lora
    inputs = (d if set(weights) & set(ATTENTION_TARGETS) else 0) + (q if "o_proj" in weights else 0) \
        + (d if set(weights) & set(MLP_IN_TARGETS) else 0) + (f if "down_proj" in weights else 0)
    lora_products = c * cfg.lora_rank * len(lora)
    policy = cfg.remat_policy
    if policy == "none":
        norms = 4 * 4  # two RMSNorms' f32 rsqrt and its square's mean
        return c * (2 * d + q + 2 * kv + 5 * f + inputs) + (4 + c) * scores + norms + lora_products
    if policy == "full":
        return c * d
    if policy == "dots":
        return c * (d + 2 * q + 2 * kv + 2 * d + 2 * f) + 4 * scores + lora_products
    return c * (d + q + 2 * kv + 2 * d + 2 * f) + lora_products


def kv_cache_bytes(cfg: LlamaConfig, batch: int, max_len: int, mesh_shape: Mapping[str, int]) -> int:
    """Per-device bytes of `models.llama.init_cache` for decoding: rows over data x fsdp, kv heads over tensor."""
    rows = math.ceil(batch / (mesh_shape["data"] * mesh_shape["fsdp"]))
    heads = math.ceil(cfg.num_kv_heads / mesh_shape["tensor"])
    return cfg.num_layers * 2 * rows * max_len * heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def size(config: ml_collections.ConfigDict, num_devices: int | None = None,
         per_device_batch: int | None = None) -> Sizing:
    """Sizes `config` on its mesh over `num_devices` (default: the devices present), optionally at another batch."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(dict(config.mesh), num_devices)))
    rules = as_rules(config.rules)
    cfg = decoder_config(config.model)
    params = param_table(config.model, mesh_shape, rules, config.stages)
    batch_rows = mesh_shape["data"] * mesh_shape["fsdp"]
    if per_device_batch is None:
        per_device_batch = math.ceil(int(config.data.global_batch_size) / batch_rows)
    seq_len = int(config.data.seq_len)
    tokens = per_device_batch * seq_len
    c = jnp.dtype(cfg.dtype).itemsize
    tensor, fsdp = mesh_shape["tensor"], mesh_shape["fsdp"]

    param_bytes = sum(x.device_bytes for x in params)
    batch_bytes = per_device_batch * (seq_len * 4 * BATCH_INT_FIELDS
                                      + int(config.data.max_embeddings_per_row) * int(config.model.domain_dim) * 4)
    layer_params = [x for x in params if x.path[:2] == ("decoder", "layers")]
    layer_gathered = sum(x.gathered_bytes for x in layer_params) // cfg.num_layers
    table_gathered = max(x.gathered_bytes for x in params if x.path[-1] in ("embed_tokens", "lm_head"))
    tables = 1 if tensor == 1 else 2  # XLA replicates a table split on both axes for the lookup (and warns)
    gathered = 0 if fsdp == 1 else tables * table_gathered + layer_gathered * (1 if cfg.scan_layers else cfg.num_layers)
    cast = sum(x.device_bytes * c // jnp.dtype(x.dtype).itemsize for x in params
               if x.group == "decoder" and jnp.dtype(x.dtype) != jnp.dtype(cfg.dtype))
    loss_chunk = int(config.model.loss_chunk)
    loss_tokens = per_device_batch * (min(loss_chunk, seq_len) if loss_chunk else seq_len)
    logits = loss_tokens * math.ceil(cfg.vocab_size / tensor) * 4 * 2

    stages = []
    for stage in config.stages:
        trainable = tuple(stage["trainable"])
        unknown = set(trainable) - set(GROUPS)
        if unknown:
            raise ValueError(f"stage {stage['name']!r}: unknown trainable groups {sorted(unknown)}; "
                             f"choose from {GROUPS}.")
        train = [x for x in params if x.group in trainable]
        train_bytes = sum(x.device_bytes for x in train)
        per_token = saved_bytes_per_token(cfg, trainable, seq_len, tensor)
        saved = cfg.num_layers * tokens * per_token + tokens * cfg.hidden_size * c  # + the input embeddings
        layer_work = tokens * saved_bytes_per_token(cfg.replace(remat_policy="none"), trainable, seq_len, tensor)
        transient = max(logits, layer_work * (1 if cfg.remat_policy == "none" else 2))
        total = param_bytes + 3 * train_bytes + batch_bytes + saved + transient + gathered + cast
        flops = train_flops_per_token(cfg, seq_len, "decoder" in trainable) * per_device_batch * batch_rows * seq_len
        stages.append(StageSizing(
            name=str(stage["name"]), trainable=trainable, trainable_params=sum(math.prod(x.shape) for x in train),
            optimizer_bytes=2 * train_bytes, gradient_bytes=train_bytes, saved_activation_bytes=saved,
            transient_bytes=transient, total_bytes=total, flops_per_step=flops,
            flops_per_device_step=flops / num_devices))
    return Sizing(
        mesh=mesh_shape, num_devices=num_devices, per_device_batch=per_device_batch,
        global_batch=per_device_batch * batch_rows, seq_len=seq_len,
        num_params=sum(math.prod(x.shape) for x in params), param_bytes=param_bytes, batch_bytes=batch_bytes,
        gathered_weight_bytes=gathered, cast_copy_bytes=cast,
        kv_cache_bytes=kv_cache_bytes(cfg, per_device_batch * batch_rows, seq_len, mesh_shape), stages=tuple(stages))


def recommend(config: ml_collections.ConfigDict, device_memory_bytes: float, num_devices: int | None = None,
              margin: float = 0.15) -> Sizing:
    """The sizing at the largest per-device batch whose peak stays under (1 - margin) of device memory."""
    budget = (1.0 - margin) * device_memory_bytes
    if size(config, num_devices, per_device_batch=1).peak_bytes > budget:
        raise ValueError(f"even a per-device batch of 1 needs more than {budget / GiB:.1f} GiB per device on mesh "
                         f"{dict(config.mesh)}; shard more (fsdp / tensor), use remat or bf16 parameters.")
    lo, hi = 1, 2
    while size(config, num_devices, per_device_batch=hi).peak_bytes <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(config, num_devices, per_device_batch=mid).peak_bytes <= budget else (lo, mid)
    return size(config, num_devices, per_device_batch=lo)


def recommend_mesh(config: ml_collections.ConfigDict, device_memory_bytes: float, num_devices: int | None = None,
                   margin: float = 0.15) -> tuple[dict[str, int], str]:
    """(mesh, why): a run whose stages never train the decoder (adapter / LoRA) gets data parallelism over every device
    with the base replicated where that fits at a per-device batch of 1 under (1 - margin) of device memory (no
    all-gathers), else FSDP over every device; a run that trains the decoder gets FSDP."""
    n = jax.device_count() if num_devices is None else num_devices
    fsdp = dict(data=1, fsdp=n, tensor=1)
    if any("decoder" in s["trainable"] for s in config.stages):
        return fsdp, "a stage trains the decoder: FSDP shards its weights, gradients and AdamW moments"
    replicated = config.copy_and_resolve_references()
    replicated.mesh = ml_collections.ConfigDict(dict(data=n, fsdp=1, tensor=1))
    sized = size(replicated, n, per_device_batch=1)
    held = f"the replicated base ({sized.param_bytes / GiB:.2f} GiB of parameters per device) peaks at " \
           f"{sized.peak_bytes / GiB:.2f} GiB at 1 row per device"
    if sized.peak_bytes <= (1.0 - margin) * device_memory_bytes:
        return replicated.mesh.to_dict(), f"{held}: it fits, data parallelism needs no all-gathers"
    return fsdp, f"{held}: more than {1 - margin:.0%} of device memory, so FSDP"


def format_table(s: Sizing, device_memory_bytes: float | None = None) -> str:
    """A plain-text table of a sizing: shared parts, then one column per stage."""
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    head = (f"mesh {s.mesh} ({s.num_devices} devices), per-device batch {s.per_device_batch} "
            f"(global {s.global_batch}) x {s.seq_len} tokens; {s.num_params / 1e6:.1f}M parameters")
    rows = [("parameters", [gib(s.param_bytes)] * len(s.stages)),
            ("optimizer (Adam mu+nu)", [gib(x.optimizer_bytes) for x in s.stages]),
            ("gradients", [gib(x.gradient_bytes) for x in s.stages]),
            ("batch", [gib(s.batch_bytes)] * len(s.stages)),
            ("saved activations", [gib(x.saved_activation_bytes) for x in s.stages]),
            ("transient (logits / layer bwd)", [gib(x.transient_bytes) for x in s.stages]),
            ("fsdp-gathered weights", [gib(s.gathered_weight_bytes)] * len(s.stages)),
            ("compute-dtype weight copies", [gib(s.cast_copy_bytes)] * len(s.stages)),
            ("total per device (GiB)", [gib(x.total_bytes) for x in s.stages])]
    if device_memory_bytes:
        rows.append(("of device memory", [f"{x.total_bytes / device_memory_bytes:.0%}" for x in s.stages]))
    rows += [("trainable parameters (M)", [f"{x.trainable_params / 1e6:.2f}" for x in s.stages]),
             ("TFLOPs per step (all devices)", [f"{x.flops_per_step / 1e12:.1f}" for x in s.stages]),
             ("TFLOPs per step per device", [f"{x.flops_per_device_step / 1e12:.2f}" for x in s.stages])]
    names = [f"{x.name} ({'+'.join(x.trainable)})" for x in s.stages]
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), 8) for n in names]
    lines = [head, " " * width + " | " + " | ".join(n.rjust(w) for n, w in zip(names, cols))]
    lines.append("-" * len(lines[-1]))
    lines += [label.ljust(width) + " | " + " | ".join(v.rjust(w) for v, w in zip(vals, cols)) for label, vals in rows]
    lines.append(f"KV cache for decoding {s.global_batch} x {s.seq_len} tokens: {gib(s.kv_cache_bytes)} GiB per device")
    return "\n".join(lines)


def abstract_params(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[nnx.GraphDef, dict, dict]:
    """The ELM's graphdef, its parameters as ShapeDtypeStructs sharded on `mesh` by the rules, and those shardings."""
    rules = as_rules(config.rules)
    graphdef, state = nnx.split(abstract_elm(config.model, constrainer(mesh, rules)))
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    params = cast_frozen(abstract_like(nnx.to_pure_dict(state), shardings), config.model, config.stages)
    return graphdef, params, shardings


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int | None = None) -> dict:
    """A train batch of the config (or `global_batch` rows) as ShapeDtypeStructs sharded over the batch axes."""
    b = int(config.data.global_batch_size) if global_batch is None else global_batch
    t, e = int(config.data.seq_len), int(config.data.max_embeddings_per_row)
    shapes = batch_spec(b, t, e, int(config.model.domain_dim))
    rules = as_rules(config.rules)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, rules, len(s))) for k, (s, d) in shapes.items()}


def lower_train_step(config: ml_collections.ConfigDict, stage_index: int, mesh: Mesh,
                     global_batch: int | None = None) -> jax.stages.Lowered:
    """The training loop's step of a stage (`train.stage_step`), lowered on abstract sharded inputs on `mesh`."""
    graphdef, params, shardings = abstract_params(config, mesh)
    stage = Curriculum(config.stages, list(config.data.tasks)).stages[stage_index]
    built = stage_step(graphdef, params, shardings, stage, len(config.data.tasks), mesh,
                       int(config.model.loss_chunk))
    return built.step.lower(built.abstract_state(params), abstract_batch(config, mesh, global_batch))


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """The compiler's memory analysis per device: argument, output, alias, temp and peak (arg + out - alias + temp)."""
    m = compiled.memory_analysis()
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
               temp=m.temp_size_in_bytes)
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def xla_train_memory(config: ml_collections.ConfigDict, stage_index: int, mesh: Mesh) -> dict[str, int]:
    """XLA's memory analysis of the compiled train step (abstract inputs, donated state) on `mesh`, per device."""
    return compiled_memory(lower_train_step(config, stage_index, mesh).compile())


def main(argv: list[str]) -> None:
    """Prints the sizing table (and the recommended batch with --memory_gib, XLA's numbers with --xla)."""
    del argv
    config = _CONFIG.value
    num_devices = _NUM_DEVICES.value or None
    if _XLA.value and num_devices not in (None, jax.device_count()):
        raise app.UsageError(f"--xla compiles on the {jax.device_count()} devices present; drop --num_devices.")
    memory = _MEMORY_GIB.value * GiB if _MEMORY_GIB.value else None
    sizing = size(config, num_devices)
    print(format_table(sizing, memory))
    if memory:
        mesh, why = recommend_mesh(config, memory, num_devices)
        print("\nrecommended mesh: " + " ".join(f"--config.mesh.{k}={v}" for k, v in mesh.items()) + f" ({why})")
        best = recommend(config, memory, num_devices)
        print(f"\nrecommended for {_MEMORY_GIB.value:g} GiB per device (15% margin): per-device batch "
              f"{best.per_device_batch} -> --config.data.global_batch_size={best.global_batch}")
        if best.per_device_batch != sizing.per_device_batch:
            print(format_table(best, memory))
    if _XLA.value:
        from ctelm_jax.parallel.mesh import make_mesh
        mesh = make_mesh(dict(config.mesh))
        for i, stage in enumerate(sizing.stages):
            xla = xla_train_memory(config, i, mesh)
            print(f"XLA {stage.name}: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in xla.items())
                  + f" GiB; tool/XLA = {stage.total_bytes / xla['peak']:.2f}")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to size.")
    _NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices to size for (0: the devices present).")
    _MEMORY_GIB = flags.DEFINE_float("memory_gib", 0.0, "Device memory in GiB: also recommend the largest batch.")
    _XLA = flags.DEFINE_bool("xla", False, "Also compile each stage's train step here and print XLA's memory analysis.")
    flags.mark_flag_as_required("config")
    app.run(console.entry_point(main, "ctelm_jax.sizing", also=(ValueError,)))
