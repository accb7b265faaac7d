"""Causal self-attention within packed segments by one of three implementations or "auto" (`model.attention`):

- "xla": plain XLA ops with a dense (B, T, S) mask, heads-major: the G = N / K query heads that share a kv head are
  stacked as rows, so the score and value products are B x K plain matmuls, (G T, D) x (D, S) and (G T, S) x (S, D),
  with no repeated keys / values and no per-head layout changes between them; XLA holds the (B, N, T, S) scores.
  Decoding with a KV cache (T new tokens against S cache slots) always takes it: there T is 1 or a prompt.
- "splash": the TPU splash-attention Pallas kernel (causal mask, `SegmentIds`, grouped-query heads native), tiled
  so that no T x S array exists (the length padded to a multiple of 128 by tokens of a segment of their own); run
  per shard by `shard_map` over the mesh of a `parallel.rules.Constrainer` (batch over its batch axes, heads over
  its head axes). Off TPU the kernel runs in Pallas interpret mode (slow: tests).
- "cudnn": cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`, GPU, bf16 / fp16 only).
  jax's API takes no segment ids, so packing goes in as the (B, 1, T, S) boolean mask, which cuDNN adds as a bias:
  T x S per row in the compute dtype, never the (B, N, T, S) scores.
- "auto": splash on TPU, cudnn on GPU in bf16 / fp16, xla otherwise (the platform of the mesh's devices, else
  `jax.default_backend()`).

Every implementation computes softmax(q k^T / sqrt(D)) v where query i sees key j iff j <= i (cache slots) and their
segment ids are equal (0 = padding, which attends only to padding).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from ctelm_jax.parallel.rules import Constrainer

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCKS = (512, 256, 128)  # kernel tile sizes tried, largest first (TPU lanes: multiples of 128)
SPLASH_PAD_SEGMENT = -1  # segment id of the tokens padding a length up to a multiple of 128: seen by none but their own


def platform(constrain: Callable | None = None) -> str:
    """The platform attention runs on: that of the Constrainer's mesh (a TPU topology compiled from a CPU host is
    'tpu'), else the default backend."""
    if isinstance(constrain, Constrainer):
        return constrain.mesh.devices.flat[0].platform
    return jax.default_backend()


def choose(implementation: str, platform_name: str, dtype: jnp.dtype) -> str:
    """The implementation that `implementation` ("auto" or a name) means on a platform for a compute dtype."""
    if implementation != "auto":
        return implementation
    if platform_name == "tpu":
        return "splash"
    if platform_name in ("gpu", "cuda") and jnp.dtype(dtype) in CUDNN_DTYPES:
        return "cudnn"
    return "xla"


def visible(q_segments: jax.Array, kv_segments: jax.Array, start: jax.Array | int) -> jax.Array:
    """(B, T, S) bool: query i (at slot start + i) sees key slot j iff j <= start + i and the segment ids match."""
    q_slots = jnp.arange(q_segments.shape[1]) + start
    k_slots = jnp.arange(kv_segments.shape[1])
    causal = k_slots[None, None, :] <= q_slots[None, :, None]
    return causal & (kv_segments[:, None, :] == q_segments[:, :, None])


def splash_length(length: int) -> int:
    """The length the kernel runs at: `length` rounded up to a multiple of 128 (its tiles' lane width)."""
    return -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]


def splash_block(length: int) -> int:
    """The kernel's tile along the sequence: the largest of SPLASH_BLOCKS dividing `splash_length(length)`."""
    return next(b for b in SPLASH_BLOCKS if splash_length(length) % b == 0)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array, kv_segments: jax.Array, *,
                  interpret: bool) -> jax.Array:
    """The kernel on one shard: q (B, N, T, D) pre-scaled, k / v (B, K, T, D), segments (B, T) -> (B, N, T, D);
    T is padded to `splash_length(T)` by tokens of their own segment, which the real ones never see."""
    heads, length = q.shape[1], q.shape[2]
    padded, block = splash_length(length), splash_block(length)
    if padded != length:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0))) for x in (q, k, v))
        q_segments, kv_segments = (jnp.pad(s, ((0, 0), (0, padded - length)), constant_values=SPLASH_PAD_SEGMENT)
                                   for s in (q_segments, kv_segments))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_segments, kv_segments))[:, :, :length]


def _fit(axes: str | tuple[str, ...] | None, size: int, mesh_shape: dict[str, int]) -> str | tuple[str, ...] | None:
    """The mesh axes of a spec entry that evenly split a dimension of `size` (the first ones; the rest replicate)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept, shards = [], 1
    for name in names:
        if size % (shards * mesh_shape[name]):
            break
        kept.append(name)
        shards *= mesh_shape[name]
    return tuple(kept) or None


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array, kv_segments: jax.Array,
            constrain: Callable | None) -> jax.Array:
    """Splash attention in the model's layout, per shard of the Constrainer's mesh when there is one."""
    b, _, n, d = q.shape
    q = (q * (1.0 / math.sqrt(d))).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    run = functools.partial(_splash_local, interpret=platform(constrain) != "tpu")
    if isinstance(constrain, Constrainer):
        mesh_shape = dict(constrain.mesh.shape)
        batch_axes, head_axes = constrain.spec(("batch", "act_heads"))
        batch_axes, head_axes = _fit(batch_axes, b, mesh_shape), _fit(head_axes, n, mesh_shape)
        head_shards = math.prod(mesh_shape[a] for a in head_axes or ())
        if k.shape[1] % head_shards:  # fewer kv heads than head shards: each shard gets its query heads' copies
            k, v = (jnp.repeat(x, n // k.shape[1], axis=1) for x in (k, v))
        heads, rows = PartitionSpec(batch_axes, head_axes), PartitionSpec(batch_axes)
        run = jax.shard_map(run, mesh=constrain.mesh, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                            check_vma=False)
    return run(q, k, v, q_segments, kv_segments).transpose(0, 2, 1, 3)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D) where `mask` (B, T, S), else -inf) v, the scores and softmax in f32: q (B, T, N, D),
    k / v (B, S, K, D) -> (B, T, N, D); query head h reads kv head h // G (G = N / K), as Llama's repeated kv heads."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    rows = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)  # (B, K, G T, D)
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, D)
    scores = jnp.einsum("bkrd,bksd->bkrs", rows, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, values)  # (B, K, G T, D)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array, kv_segments: jax.Array, *,
           start: jax.Array | None = None, implementation: str = "xla",
           constrain: Callable | None = None) -> jax.Array:
    """Attention of q (B, T, N, D) over k, v (B, S, K, D) -> (B, T, N, D), N a multiple of K.

    `q_segments` (B, T) and `kv_segments` (B, S) are segment ids (0 padding, equal non-zero ids: one packed example).
    `start`: the cache slot of q's first token when attending over a KV cache (then always xla); None: self-attention,
    S == T. `implementation`: one of IMPLEMENTATIONS; `constrain`: the model's, whose mesh splash is mapped over."""
    name = "xla" if start is not None else choose(implementation, platform(constrain), q.dtype)
    if name == "splash":
        return _splash(q, k, v, q_segments, kv_segments, constrain)
    mask = visible(q_segments, kv_segments, 0 if start is None else start)
    if name == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if name == "xla":
        return _xla(q, k, v, mask)
    raise ValueError(f"attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")
