"""Embedding prediction (text -> vector): a Linear on the decoder's final hidden states, mean-pooled over a text.

The head reads the normed hidden states h_t over the tokens of a text (the ones `pool_ids` marks) and predicts the
frozen encoder's embedding of that text: e_hat = normalise(W mean_t(h_t) + b). It is trained with
1 - cos(e_hat, e), weighted by `loss_weight`, beside reconstruction (vector -> text).

Mean pooling, not the last token: the encoder it imitates mean-pools too, every token of the text gets a gradient,
and for causal decoders without contrastive training mean pooling beats the last token's state (SGPT, LLM2Vec),
which mostly encodes the next-token prediction at that point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.models.layers import Dense


def pool(hidden: jax.Array, pool_ids: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """(means (B, slots, D) float32, token counts (B, slots)) of the hidden states (B, T, D) whose `pool_ids` (B, T)
    is s + 1, for each slot s; `pool_ids` 0 marks tokens pooled nowhere."""
    onehot = jax.nn.one_hot(pool_ids - 1, slots, dtype=jnp.float32)  # id 0 -> the all-zero row
    counts = onehot.sum(axis=1)
    sums = jnp.einsum("bts,btd->bsd", onehot, hidden.astype(jnp.float32))
    return sums / jnp.maximum(counts, 1.0)[..., None], counts


class EmbedHead(nnx.Module):
    """mean-pooled hidden state (..., D) -> unit vector (..., d_domain) in the encoder's space."""

    def __init__(self, model_dim: int, domain_dim: int, loss_weight: float, *, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype = jnp.float32):
        self.proj = Dense(model_dim, domain_dim, ("embed", "domain"), rngs=rngs, use_bias=True,
                          param_dtype=param_dtype)
        self.loss_weight = loss_weight

    def __call__(self, pooled: jax.Array) -> jax.Array:
        y = self.proj(pooled.astype(jnp.float32))
        # Not y / norm(y): an empty slot gives y = b, possibly 0, where norm's gradient is NaN (and 0 * NaN = NaN).
        return y * jax.lax.rsqrt(jnp.maximum((y * y).sum(-1, keepdims=True), 1e-24))


def cosine_loss(predicted: jax.Array, target: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean of 1 - cos(predicted, target), number of texts) over the slots with tokens (`counts` > 0); `predicted`
    (B, S, d) is unit length, `target` (B, S, d) any length."""
    valid = (counts > 0).astype(jnp.float32)
    target = target.astype(jnp.float32)
    cos = (predicted * target).sum(-1) * jax.lax.rsqrt(jnp.maximum((target * target).sum(-1), 1e-24))
    n = valid.sum()
    return ((1.0 - cos) * valid).sum() / jnp.maximum(n, 1.0), n
