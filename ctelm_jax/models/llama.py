"""A Llama-family decoder in Flax NNX: RMSNorm, half-split RoPE (Llama-3 scaling), grouped-query attention, SwiGLU.

Layout and names follow Hugging Face's `LlamaForCausalLM` (kernels stored transposed, (in, out)), so weight
conversion is a rename plus a transpose. Every parameter carries logical axis names; `parallel.rules` maps them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.models.attention import attend
from ctelm_jax.models.layers import LogicalAxes, RMSNorm, logical_param
from ctelm_jax.models.lora import Projection

Constrain = Callable[[jax.Array, LogicalAxes], jax.Array]
KVCache = dict[str, Any]  # see `init_cache`

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def no_constraint(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """The identity: activations keep whatever sharding XLA picks (single device, tests)."""
    del axes
    return x


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama decoder, with LoRA and compile-time options."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # models.attention.IMPLEMENTATIONS: auto, xla, splash, cudnn
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj")

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "LlamaConfig":
        """Builds a config from a Hugging Face `config.json` dict; rejects other architectures."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ValueError(
                f"config.json has model_type={model_type!r} (architectures={hf.get('architectures')}); "
                "ctelm_jax's decoder is a Llama: expected model_type 'llama' (Llama 2/3.x, SmolLM2, TinyLlama)."
            )
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("config.json asks for attention_bias/mlp_bias; the Llama decoder here has no biases.")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"config.json has rope type {rope_type!r}; supported: default, llama3.")
        eos = hf.get("eos_token_id")
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` for `LlamaForCausalLM` with this architecture."""
        rope: dict[str, Any] | None = None
        if self.rope_scaling is not None:
            rope = dict(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rope_theta": self.rope_theta, "rope_scaling": rope,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "torch_dtype": self.param_dtype,
        }

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies (head_dim // 2,), with Llama-3 scaling when configured (as in HF)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x (B, T, N, D) by its positions (B, T), half-split layout: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty KV cache: keys/values, per-slot segment ids (0 = empty), next write slot.

    Keys and values are one (B, S, K, D) array per layer (a tuple), so that each step's write updates that layer's
    buffer in place; with `scan_layers` they are stacked (L, B, S, K, D), the form `lax.scan` carries."""
    kv_shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
        k = v = jnp.zeros((cfg.num_layers, *kv_shape), dtype)
    else:
        k = v = tuple(jnp.zeros(kv_shape, dtype) for _ in range(cfg.num_layers))
    return {"k": k, "v": v, "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "end": jnp.zeros((), jnp.int32)}


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; reads and writes one layer's slice of a KV cache."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, constrain: Constrain = no_constraint):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, h, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

        def proj(name: str, i: int, o: int, axes: LogicalAxes) -> Projection:
            rank = cfg.lora_rank if name in cfg.lora_targets else 0
            return Projection(i, o, axes, rngs=rngs, lora_rank=rank, lora_alpha=cfg.lora_alpha, param_dtype=pd, dtype=dt)

        self.q_proj = proj("q_proj", d, h, ("embed", "heads"))
        self.k_proj = proj("k_proj", d, kv, ("embed", "kv_heads"))
        self.v_proj = proj("v_proj", d, kv, ("embed", "kv_heads"))
        self.o_proj = proj("o_proj", h, d, ("heads", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.implementation = cfg.attention
        self.constrain = constrain

    def __call__(
        self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, segments: tuple[jax.Array, jax.Array],
        cache_kv: tuple[jax.Array, jax.Array] | None, start: jax.Array | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention of x's T tokens (segment ids `segments` = (queries', keys')) over themselves, or over the cache
        slots with the T new keys / values written at `start`."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = self.constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = self.constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", None))
        v = self.constrain(v, ("batch", "length", "act_kv_heads", None))
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), (0, start, 0, 0))
            cache_kv = (k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), *segments, start=start,
                     implementation=self.implementation, constrain=self.constrain)
        out = self.constrain(out.reshape(b, t, -1), ("batch", "length", "act_heads"))
        return self.o_proj(out), cache_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, constrain: Constrain = no_constraint):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size

        def proj(name: str, i: int, o: int, axes: LogicalAxes) -> Projection:
            rank = cfg.lora_rank if name in cfg.lora_targets else 0
            return Projection(i, o, axes, rngs=rngs, lora_rank=rank, lora_alpha=cfg.lora_alpha, param_dtype=pd, dtype=dt)

        self.gate_proj = proj("gate_proj", d, f, ("embed", "mlp"))
        self.up_proj = proj("up_proj", d, f, ("embed", "mlp"))
        self.down_proj = proj("down_proj", f, d, ("mlp", "embed"))
        self.constrain = constrain

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.constrain(h, ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, constrain: Constrain = no_constraint):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=dt)
        self.self_attn = Attention(cfg, rngs=rngs, constrain=constrain)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=dt)
        self.mlp = MLP(cfg, rngs=rngs, constrain=constrain)
        self.constrain = constrain

    def __call__(self, x, positions, inv_freq, segments, cache_kv=None, start=None):
        """One layer; returns the new residual stream and this layer's updated (k, v) cache or None."""
        attn, cache_kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, segments, cache_kv, start)
        x = self.constrain(x + attn, ("batch", "length", "act_embed"))
        x = self.constrain(x + self.mlp(self.post_attention_layernorm(x)), ("batch", "length", "act_embed"))
        return x, cache_kv


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters are the layers' stacked on a leading 'layers' axis (for lax.scan)."""
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("out_sharding") or (None,) * vs[0][...].ndim
        return vs[0].replace(jnp.stack([v[...] for v in vs]), out_sharding=("layers", *axes))

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


class Llama(nnx.Module):
    """The decoder: token (or given) embeddings -> L blocks -> norm -> logits over the vocabulary."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, constrain: Constrain = no_constraint):
        pd = jnp.dtype(cfg.param_dtype)
        self.config = cfg
        self.constrain = constrain
        self.embed_tokens = logical_param(
            rngs.params(), nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        blocks = [Block(cfg, rngs=rngs, constrain=constrain) for _ in range(cfg.num_layers)]
        self.layers = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, dtype=jnp.dtype(cfg.dtype))
        self.lm_head = None if cfg.tie_word_embeddings else logical_param(
            rngs.params(), nnx.initializers.normal(0.02), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Looks up input embeddings (B, T) -> (B, T, hidden) in the compute dtype."""
        return self.embed_tokens[...][tokens].astype(jnp.dtype(self.config.dtype))

    def logits(self, x: jax.Array) -> jax.Array:
        """Logits (B, T, V) float32 of final hidden states (B, T, hidden): the LM head (the embedding when tied)."""
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("btd,dv->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)

    def __call__(
        self, tokens: jax.Array | None = None, *, embeds: jax.Array | None = None,
        positions: jax.Array | None = None, segment_ids: jax.Array | None = None, cache: KVCache | None = None,
        last_only: bool = False, hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits (B, T, V) in float32 (B, 1, V for the last position only, as a prefill needs) and the updated cache;
        with `hidden`, the final normed hidden states (B, T, D) instead of logits (`head` turns them into logits).

        `segment_ids` (B, T) mark which tokens may attend to which (equal ids, causally); 0 is padding.
        With a cache, the T new tokens are written at slot `cache['end']` and attend to every earlier slot.
        """
        cfg = self.config
        x = self.embed(tokens) if embeds is None else embeds.astype(jnp.dtype(cfg.dtype))
        b, t, _ = x.shape
        x = self.constrain(x, ("batch", "length", "act_embed"))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        start = None if cache is None else cache["end"]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t)) + (0 if start is None else start)
        if cache is None:
            key_segments = segment_ids
        else:
            key_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))
        inv_freq = rope_frequencies(cfg)
        policy = REMAT_POLICIES[cfg.remat_policy]
        has_cache = cache is not None

        def run_block(block: Block, h: jax.Array, kv):
            return block(h, positions, inv_freq, (segment_ids, key_segments), kv, start)

        if cfg.remat_policy != "none":
            run_block = nnx.remat(run_block, policy=policy)

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, xs):
                layer_state, kv = xs
                h, kv = run_block(nnx.merge(graphdef, layer_state), h, kv)
                return h, kv

            kvs = (cache["k"], cache["v"]) if has_cache else None
            x, new_kv = jax.lax.scan(body, x, (stacked, kvs))
        else:
            ks, vs = [], []
            for i, block in enumerate(self.layers):
                x, kv = run_block(block, x, (cache["k"][i], cache["v"][i]) if has_cache else None)
                if has_cache:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_kv = (tuple(ks), tuple(vs)) if has_cache else None

        x = self.norm(x[:, -1:] if last_only else x)
        logits = x if hidden else self.constrain(self.logits(x), ("batch", "length", "act_vocab"))
        if not has_cache:
            return logits, None
        new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": key_segments, "end": start + t}
        return logits, new_cache
