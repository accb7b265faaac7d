"""Text -> embedding with a trained ELM: its embedding-prediction head on the decoder's hidden states over the text
(`models.embed_head`), the inverse of decoding. `decode --mode=embed` prints these vectors."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctelm_jax.data.tasks import embed_prompt
from ctelm_jax.errors import UserError
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import pool
from ctelm_jax.weights.tokenizer import Tokenizer

LENGTH_BUCKET = 64  # prompts are padded to a multiple of this, so a few shapes compile


@partial(jax.jit, static_argnums=0)
def _predict(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array,
             pool_ids: jax.Array) -> jax.Array:
    """Unit vectors (B, d_domain) predicted for the texts that `pool_ids` marks in each row."""
    model = nnx.merge(graphdef, state)
    no_embeddings = jnp.zeros((tokens.shape[0], 1, model.adapter.domain_dim), jnp.float32)
    hidden, _ = model(tokens, no_embeddings, segment_ids=segment_ids, hidden=True)
    return model.embed_head(pool(hidden, pool_ids, 1)[0])[:, 0]


def embed_texts(model: ELM, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 16,
                max_len: int = 512) -> np.ndarray:
    """The ELM's predicted encoder embeddings (n, d_domain), unit length, of `texts` (each cut to `max_len` tokens
    with its prompt, the `embed` task's)."""
    if model.embed_head is None:
        raise UserError("this model has no embedding-prediction head; train it with model.embed_pred_weight > 0 and "
                        "the `embed` task in a stage (configs/base.py does).")
    if not texts:
        return np.zeros((0, model.adapter.domain_dim), np.float32)
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [embed_prompt(tokenizer, t, max_len) for t in texts[start:start + batch_size]]
        length = -(-max(len(ids) for ids, _ in encoded) // LENGTH_BUCKET) * LENGTH_BUCKET
        tokens = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        segment_ids = np.zeros((batch_size, length), np.int32)
        pool_ids = np.zeros((batch_size, length), np.int32)
        for row, (ids, mask) in enumerate(encoded):
            tokens[row, :len(ids)], segment_ids[row, :len(ids)], pool_ids[row, :len(ids)] = ids, 1, mask
        out.append(np.asarray(_predict(graphdef, state, tokens, segment_ids, pool_ids))[:len(encoded)])
    return np.concatenate(out).astype(np.float32)
