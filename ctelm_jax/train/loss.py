"""Per-token negative log-likelihood of the targets, from logits or, chunk by chunk, from the final hidden states.

nll[b, t] = logsumexp_v(logits[b, t, v]) - logits[b, t, target[b, t]]. Target ids past the vocabulary (the
placeholder added to the tokenizer) are never scored: their gather reads id 0 and the caller masks them out.

`chunked_nll` never holds the (B, T, V) float32 logits: it scans over the sequence in chunks of `chunk` positions
(every row at once, so the batch keeps its sharding), and each chunk's logits are rematerialised in the backward pass
(`jax.checkpoint`), so forward and backward keep (B, chunk, V) logits live at a time. The gradients of the hidden
states and of the head's weights (read inside `head`) are the full-logits path's, summed chunk by chunk.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token: logits (..., V) float32, targets (...) int -> (...)."""
    vocab = logits.shape[-1]
    targets = jnp.where(targets < vocab, targets, 0)  # past the vocabulary: masked by the caller, gather kept in range
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def chunked_nll(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                chunk: int) -> jax.Array:
    """`nll(head(hidden), targets)` (B, T) computed `chunk` positions at a time: hidden (B, T, D), head (B, c, D) ->
    (B, c, V) float32 logits; T is padded to a multiple of `chunk` (padding is scored against id 0, then dropped)."""
    b, t, d = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # (n, B, chunk, ...): the scan runs over chunks of the sequence; each step sees every row.
    hidden_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_nll(h: jax.Array, y: jax.Array) -> jax.Array:
        return nll(head(h), y)

    def body(carry: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        return carry, chunk_nll(*xs)

    _, out = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
