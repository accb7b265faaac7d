"""The adapter: one domain embedding -> one soft token, Linear -> ReLU -> Linear (as ELM and OpenELM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.models.layers import Dense


class Adapter(nnx.Module):
    """e (..., d_domain) -> W2 relu(W1 e + b1) + b2 (..., d_model)."""

    def __init__(
        self, domain_dim: int, hidden_dim: int, model_dim: int, *, rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32,
    ):
        self.fc_in = Dense(domain_dim, hidden_dim, ("domain", "adapter"), rngs=rngs, use_bias=True,
                           param_dtype=param_dtype, dtype=dtype)
        self.fc_out = Dense(hidden_dim, model_dim, ("adapter", "embed"), rngs=rngs, use_bias=True,
                            param_dtype=param_dtype, dtype=dtype)
        self.domain_dim = domain_dim

    def __call__(self, e: jax.Array) -> jax.Array:
        return self.fc_out(jax.nn.relu(self.fc_in(e)))
