"""The adapter: one domain embedding -> k soft tokens, Linear -> ReLU -> Linear (as ELM and OpenELM, whose k is 1;
vec2text expands one vector into several), applied to the embedding standardised by the training corpus's statistics.
The second Linear's k * model-dim outputs are the k tokens in order: token j is outputs [j * D, (j + 1) * D).

Sentence embeddings of one corpus crowd together (all-MiniLM-L6-v2 on the shipped trials: mean pairwise cosine 0.35,
per-dimension std 0.04), so the part that tells trials apart is small next to the shared mean. `(e - mean) / scale`
makes it O(1) before the first Linear; training sets mean and scale once from the training split and never updates
them. The map stays one affine layer + ReLU + affine layer: export folds the standardisation into `fc_in`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctelm_jax.models.layers import Dense


class InputStats(nnx.Variable):
    """A fixed (never trained) statistic of the adapter's input."""


class Adapter(nnx.Module):
    """e (..., d_domain) -> W2 relu(W1 (e - mean) / scale + b1) + b2, reshaped to k tokens (..., k, d_model)."""

    def __init__(
        self, domain_dim: int, hidden_dim: int, model_dim: int, *, rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32, tokens_per_embedding: int = 1,
    ):
        self.input_mean = InputStats(jnp.zeros((domain_dim,), jnp.float32), out_sharding=("domain",),
                                     eager_sharding=False)
        self.input_scale = InputStats(jnp.ones((domain_dim,), jnp.float32), out_sharding=("domain",),
                                      eager_sharding=False)
        self.fc_in = Dense(domain_dim, hidden_dim, ("domain", "adapter"), rngs=rngs, use_bias=True,
                           param_dtype=param_dtype, dtype=dtype)
        self.fc_out = Dense(hidden_dim, tokens_per_embedding * model_dim, ("adapter", "embed"), rngs=rngs,
                            use_bias=True, param_dtype=param_dtype, dtype=dtype)
        self.domain_dim = domain_dim
        self.tokens_per_embedding = tokens_per_embedding

    def __call__(self, e: jax.Array) -> jax.Array:
        x = (e.astype(jnp.float32) - self.input_mean[...]) / self.input_scale[...]
        y = self.fc_out(jax.nn.relu(self.fc_in(x)))
        return y.reshape(*y.shape[:-1], self.tokens_per_embedding, -1)


def standardisation(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of a corpus's embeddings: the per-dimension mean, and one scale for every dimension (the RMS of
    the centred coordinates), so that directions (concept vectors, interpolations) keep their geometry."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"adapter statistics need a (n >= 2, d) array of embeddings, got shape {x.shape}.")
    mean = x.mean(axis=0)
    rms = float(np.sqrt(np.mean((x - mean) ** 2)))
    if not np.isfinite(rms) or rms <= 0:
        raise ValueError(f"the training embeddings have no spread (centred RMS {rms}); are they all the same vector?")
    return mean.astype(np.float32), np.full(x.shape[1], rms, np.float32)


def set_standardisation(adapter: Adapter, embeddings: np.ndarray) -> None:
    """Sets the adapter's input statistics from a corpus's embeddings (before training starts)."""
    mean, scale = standardisation(embeddings)
    adapter.input_mean[...] = jnp.asarray(mean)
    adapter.input_scale[...] = jnp.asarray(scale)


def folded_input_layer(adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (in, out), bias) of one Linear equal to standardise-then-`fc_in`: W / scale and b - (mean / scale) W."""
    kernel = np.asarray(adapter.fc_in.kernel[...], np.float64)
    bias = np.asarray(adapter.fc_in.bias[...], np.float64)
    mean = np.asarray(adapter.input_mean[...], np.float64)
    scale = np.asarray(adapter.input_scale[...], np.float64)
    folded = kernel / scale[:, None]
    return folded, bias - mean @ folded
