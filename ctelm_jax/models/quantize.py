"""Weight-only int8 for decoding: each decoder projection (LoRA merged in first) and the vocabulary tables (the
embedding, the LM head or the tied embedding used as head) as int8 with one float32 scale per output channel.

Symmetric per channel: scale = max |w| over the channel / 127, q = round(w / scale), so |q * scale - w| <= scale / 2.
Matmuls dequantise on the fly: y = (x @ q) * scale, the scale applied to the (small) output, not to the weight.
Decoding at a small batch reads every weight once per token, so int8 reads a quarter of float32's bytes; whether
that is faster depends on the backend fusing the int8 -> float convert into the matmul (BENCHMARKS.md). The adapter
stays as it is (it runs once per prompt, not per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.errors import UserError
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Llama
from ctelm_jax.models.lora import Projection

Q_MAX = 127


class Int8(nnx.Variable):
    """An int8 weight or its per-channel scales (never trained: decoding only)."""


def quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(q int8, scale float32) of `w` with one scale per slice along every axis but `axis` (the reduced one)."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / Q_MAX, 1.0)  # an all-zero channel (a fresh LoRA B) keeps scale 1
    q = jnp.clip(jnp.round(w / scale), -Q_MAX, Q_MAX).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis)


def dequantize(q: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
    """The float32 weight that (q, scale) stand for."""
    return q.astype(jnp.float32) * jnp.expand_dims(scale, axis)


class Int8Dense(nnx.Module):
    """y = (x @ q) * scale for a kernel (..., in, out) held as int8 with one scale per output column."""

    def __init__(self, kernel: jax.Array, dtype: jnp.dtype):
        q, scale = quantize(kernel, axis=-2)
        self.q, self.scale = Int8(q), Int8(scale)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.q[...].astype(self.dtype))
        return y * self.scale[...].astype(self.dtype)


class Int8Llama(Llama):
    """A Llama whose projections and vocabulary tables are int8 (one scale per output channel / vocabulary row);
    its blocks, norms and decoding are the float model's."""

    def __init__(self, model: Llama):  # takes the float model's parts; no parameters are initialised
        self.config, self.constrain, self.norm = model.config, model.constrain, model.norm
        self.layers = nnx.merge(*nnx.split(model.layers))  # new modules over the same arrays: `model` stays float
        dtype = jnp.dtype(model.config.dtype)
        for module in [m for _, m in nnx.iter_graph(self.layers) if isinstance(m, Projection)]:
            kernel = module.base.kernel[...].astype(jnp.float32)
            if module.lora is not None:
                kernel = kernel + module.lora.delta()
            module.base, module.lora = Int8Dense(kernel, dtype), None
        self.embed_q, self.embed_scale = map(Int8, quantize(model.embed_tokens[...], axis=1))  # (V, D), (V,)
        self.head_q, self.head_scale = (None, None) if model.lm_head is None else map(
            Int8, quantize(model.lm_head[...], axis=0))  # (D, V), (V,)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings: the int8 rows times their scales, in the compute dtype."""
        rows = self.embed_q[...][tokens].astype(jnp.float32) * self.embed_scale[...][tokens][..., None]
        return rows.astype(jnp.dtype(self.config.dtype))

    def logits(self, x: jax.Array) -> jax.Array:
        """Logits (B, T, V) float32: (x @ q) * scale per vocabulary entry (the tied table read as (V, D))."""
        if self.head_q is None:
            y = jnp.einsum("btd,vd->btv", x, self.embed_q[...].astype(x.dtype), preferred_element_type=jnp.float32)
            return y * self.embed_scale[...]
        y = jnp.einsum("btd,dv->btv", x, self.head_q[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return y * self.head_scale[...]


QUANTIZE_MODES = ("none", "int8")


def quantize_elm(model: ELM, mode: str = "int8") -> ELM:
    """The ELM for decoding with weight-only `mode` ('none': `model` itself); `model` is left unchanged."""
    if mode not in QUANTIZE_MODES:
        raise UserError(f"--quantize={mode!r}; choose one of {QUANTIZE_MODES}.")
    if mode == "none":
        return model
    return ELM(Int8Llama(model.decoder), model.adapter, model.placeholder_id, model.embed_head)
