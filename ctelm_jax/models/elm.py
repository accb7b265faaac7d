"""The Embedding Language Model: adapter outputs spliced into the decoder's input at placeholder tokens.

An embedding becomes k = `tokens_per_embedding` soft tokens at k consecutive placeholders: the n-th placeholder of a
row receives soft token n % k of embedding n // k (k = 1: the n-th embedding's one token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.embed_head import EmbedHead
from ctelm_jax.models.llama import KVCache, Llama


def splice(token_embeds: jax.Array, soft_tokens: jax.Array, is_placeholder: jax.Array) -> jax.Array:
    """Puts soft_tokens[b, n] at the n-th placeholder of row b (a mask scatter, no loops).

    token_embeds (B, T, D), soft_tokens (B, N, D), is_placeholder (B, T) bool; rows with more than N placeholders
    reuse the last soft token (the data pipeline never builds such rows).
    """
    slot = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, soft_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(soft_tokens, slot[..., None], axis=1)
    return jnp.where(is_placeholder[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class ELM(nnx.Module):
    """decoder(splice(embed(tokens), adapter(embeddings) as E * k tokens)) -> next-token logits; with an
    `embed_head`, also text -> embedding from the decoder's hidden states (`models.embed_head`)."""

    def __init__(self, decoder: Llama, adapter: Adapter, placeholder_id: int, embed_head: EmbedHead | None = None):
        self.decoder = decoder
        self.adapter = adapter
        self.placeholder_id = placeholder_id
        self.embed_head = embed_head

    @property
    def tokens_per_embedding(self) -> int:
        """k: the soft tokens (and placeholders) per embedding."""
        return self.adapter.tokens_per_embedding

    def input_embeddings(self, tokens: jax.Array, embeddings: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D) with the adapter's soft tokens at the placeholder positions."""
        is_placeholder = tokens == self.placeholder_id
        # The placeholder may lie past the decoder's vocabulary (added to the tokenizer): never look it up.
        token_embeds = self.decoder.embed(jnp.where(is_placeholder, 0, tokens))
        soft = self.adapter(embeddings.astype(jnp.float32))  # (B, E, k, D)
        b, e, k, d = soft.shape
        return splice(token_embeds, soft.reshape(b, e * k, d), is_placeholder)

    def __call__(
        self, tokens: jax.Array, embeddings: jax.Array, *, positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None, cache: KVCache | None = None, hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits (B, T, V) float32 (with `hidden`: final hidden states (B, T, D)) and the updated KV cache;
        `embeddings` is (B, E, d_domain)."""
        x = self.input_embeddings(tokens, embeddings)
        return self.decoder(embeds=x, positions=positions, segment_ids=segment_ids, cache=cache, hidden=hidden)
