"""KV-cache decoding with the Llama decoder (greedy, one sequence)."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctelm_jax.models.llama import KVCache, Llama, init_cache


@partial(jax.jit, static_argnums=0)
def _next_token(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, embeds: jax.Array | None, cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Runs `tokens` (or `embeds`) through the decoder after the cache; the argmax next token (B,) and the cache."""
    logits, cache = nnx.merge(graphdef, state)(tokens, embeds=embeds, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy_decode(
    model: Llama, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
    embeds: jax.Array | np.ndarray | None = None,
) -> list[int]:
    """Greedy continuation of one prompt: the new token ids, up to and including the first of `eos_ids`.

    `embeds` (T, hidden) or (1, T, hidden), if given, replaces the prompt's input embeddings (soft tokens);
    `prompt_ids` still sets the prompt length.
    """
    if not prompt_ids or max_new_tokens <= 0:
        return []
    cfg = model.config
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray([list(prompt_ids)], jnp.int32)
    if embeds is not None:
        embeds = jnp.asarray(embeds).reshape(1, len(prompt_ids), cfg.hidden_size)
    cache = init_cache(cfg, 1, len(prompt_ids) + max_new_tokens, jnp.dtype(cfg.dtype))
    token, cache = _next_token(graphdef, state, tokens, embeds, cache)
    out: list[int] = []
    stop = set(eos_ids)
    while True:
        out.append(int(token[0]))
        if out[-1] in stop or len(out) == max_new_tokens:
            return out
        token, cache = _next_token(graphdef, state, token[:, None], None, cache)
