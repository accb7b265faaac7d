"""Low-rank adaptation: y = x W + (alpha / r) * x A B, with B starting at zero so training starts from the base model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.models.layers import Dense, LogicalAxes, logical_param


class LoRAParam(nnx.Param):
    """A LoRA factor; its own type so optimizers and exporters can select it by filter."""


class LoRA(nnx.Module):
    """The low-rank update x -> (alpha / r) * (x @ a) @ b."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, axes: LogicalAxes, *,
        rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32,
    ):
        self.a = logical_param(rngs.params(), nnx.initializers.he_uniform(), (in_features, rank),
                               (axes[0], None), param_dtype, kind=LoRAParam)
        self.b = logical_param(rngs.params(), nnx.initializers.zeros, (rank, out_features),
                               (None, axes[1]), param_dtype, kind=LoRAParam)
        self.scale = alpha / rank
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return self.scale * ((x @ self.a[...].astype(self.dtype)) @ self.b[...].astype(self.dtype))

    def delta(self) -> jax.Array:
        """The dense (in, out) update this adapter adds to its base kernel."""
        return self.scale * (self.a[...] @ self.b[...])


class Projection(nnx.Module):
    """A bias-free Dense with an optional LoRA beside it (rank 0 means none)."""

    def __init__(
        self, in_features: int, out_features: int, axes: LogicalAxes, *, rngs: nnx.Rngs,
        lora_rank: int = 0, lora_alpha: float = 16.0,
        param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32,
    ):
        self.base = Dense(in_features, out_features, axes, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.lora = (
            LoRA(in_features, out_features, lora_rank, lora_alpha, axes, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
            if lora_rank > 0 else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        return y if self.lora is None else y + self.lora(x)
