"""Building blocks shared by the decoder, the encoder and the adapter: logical-axis parameters, Dense, RMSNorm."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
LogicalAxes = tuple[str | None, ...]


def logical_param(
    key: jax.Array, init: Initializer, shape: Sequence[int], axes: LogicalAxes, dtype: jnp.dtype,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
    """A parameter that records its logical axis names (read by `parallel.rules`), not a mesh placement."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    return kind(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel is stored (in, out), the transpose of PyTorch's `weight`."""

    def __init__(
        self, in_features: int, out_features: int, axes: LogicalAxes, *, rngs: nnx.Rngs,
        use_bias: bool = False, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
    ):
        self.kernel = logical_param(rngs.params(), kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (
            logical_param(rngs.params(), nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
            if use_bias else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",), eager_sharding=False)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(self.dtype)
