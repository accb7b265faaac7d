"""Embedding prediction (text -> vector): the head's pooling, loss and gradient by hand, its place in the train loss,
and `embed_texts` on a small trained ELM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ctelm_jax.models.adapter import Adapter
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import EmbedHead, cosine_loss, pool
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.text_embedding import embed_texts
from ctelm_jax.train.step import loss_and_metrics

DOMAIN = 24
CFG = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=True)


def test_loss_and_gradient_by_hand():
    # Slot 1 pools tokens 0 and 1: mean (3, 4); token 2 is pooled nowhere (its huge value must not count); slot 2 is
    # empty and left out of the mean. With W = I, b = 0: y = (3, 4), |y| = 5, y_hat = (0.6, 0.8).
    hidden = jnp.asarray([[[2.0, 4.0], [4.0, 4.0], [100.0, -100.0]]])
    pool_ids = jnp.asarray([[1, 1, 0]])
    target = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
    head = EmbedHead(2, 2, loss_weight=1.0, rngs=nnx.Rngs(0))
    head.proj.kernel[...] = jnp.eye(2)
    head.proj.bias[...] = jnp.zeros(2)

    graphdef, params = nnx.split(head)

    def loss_of(params):
        pooled, counts = pool(hidden, pool_ids, 2)
        return cosine_loss(nnx.merge(graphdef, params)(pooled), target, counts)

    (loss, n), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    grad = grads["proj"]["bias"][...]
    # loss = 1 - cos((3, 4), (1, 0)) = 1 - 0.6; one text.
    np.testing.assert_allclose(float(loss), 0.4, rtol=1e-6)
    assert float(n) == 1.0
    # d(1 - y_hat . t)/db = -(t - (y_hat . t) y_hat) / |y| = -((1, 0) - 0.6 (0.6, 0.8)) / 5 = (-0.128, 0.096).
    # float32 arithmetic on O(1) numbers: 1e-6 relative is ~10 ulps.
    np.testing.assert_allclose(np.asarray(grad), [-0.128, 0.096], rtol=1e-6, atol=1e-7)


def make_model(weight: float, seed: int = 0) -> ELM:
    rngs = nnx.Rngs(seed)
    decoder = Llama(CFG, rngs=rngs)
    adapter = Adapter(DOMAIN, 32, CFG.hidden_size, rngs=rngs)
    return ELM(decoder, adapter, CFG.vocab_size, EmbedHead(CFG.hidden_size, DOMAIN, weight, rngs=rngs))


def batch_with_texts(pooled: bool) -> dict[str, np.ndarray]:
    """Two rows of 16 tokens: a placeholder example (tokens 0-7, loss on 3-6) and a text (8-15, pooled as slot 1)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (2, 16)).astype(np.int32)
    tokens[:, 1] = CFG.vocab_size
    segment_ids = np.repeat([[1] * 8 + [2] * 8], 2, axis=0).astype(np.int32)
    loss_mask = np.zeros((2, 16), np.float32)
    loss_mask[:, 3:7] = 1
    pool_ids = np.zeros((2, 16), np.int32)
    pool_ids[:, 10:15] = 1 if pooled else 0
    targets_e = rng.standard_normal((2, 2, DOMAIN)).astype(np.float32)
    targets_e[:, 1] = 0  # unused slot
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": np.tile(np.r_[np.arange(8), np.arange(8)], (2, 1)).astype(np.int32),
            "embeddings": rng.standard_normal((2, 1, DOMAIN)).astype(np.float32),
            "task_ids": np.zeros((2, 16), np.int32), "pool_ids": pool_ids, "embed_targets": targets_e}


def test_train_loss_adds_the_weighted_embedding_loss():
    model = make_model(weight=0.5)
    headless = ELM(model.decoder, model.adapter, model.placeholder_id)
    batch = {k: jnp.asarray(v) for k, v in batch_with_texts(pooled=True).items()}
    loss, m = loss_and_metrics(model, batch, 1)
    token_loss, _ = loss_and_metrics(headless, batch, 1)
    assert float(m["embed_texts"]) == 2.0 and 0.0 < float(m["embed_loss"]) < 2.0
    # Same forward pass, so the token part is identical up to float32 reassociation (~1e-6 of a loss of ~10).
    np.testing.assert_allclose(float(loss), float(token_loss) + 0.5 * float(m["embed_loss"]), rtol=1e-5)
    quiet = {**batch, "pool_ids": jnp.zeros_like(batch["pool_ids"])}
    loss0, m0 = loss_and_metrics(model, quiet, 1)
    assert float(m0["embed_texts"]) == 0.0 and float(loss0) == float(token_loss)  # no texts: no embedding term


def test_embed_texts_learns_unit_vectors_of_the_encoder_space(tokenizer):
    texts = ["Phase: phase 2\nConditions: asthma", "Phase: phase 3\nConditions: breast cancer",
             "Phase: phase 1\nConditions: healthy volunteers"]
    targets = np.random.default_rng(1).standard_normal((3, DOMAIN)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    model = make_model(weight=1.0)
    before = embed_texts(model, tokenizer, texts, batch_size=2)
    assert before.shape == (3, DOMAIN) and before.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, rtol=1e-5)  # normalised in float32

    # 60 Adam steps on the head alone, on the same prompts embed_texts builds, fit three targets (it can: the pooled
    # states of three different texts are linearly independent in 32 dimensions).
    from ctelm_jax.data.tasks import embed_prompt

    encoded = [embed_prompt(tokenizer, t) for t in texts]
    length = max(len(ids) for ids, _ in encoded)
    tokens = np.full((3, length), tokenizer.pad_id, np.int32)
    segment_ids, pool_ids = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, (ids, mask) in enumerate(encoded):
        tokens[row, :len(ids)], segment_ids[row, :len(ids)], pool_ids[row, :len(ids)] = ids, 1, mask
    hidden, _ = model(jnp.asarray(tokens), jnp.zeros((3, 1, DOMAIN)), segment_ids=jnp.asarray(segment_ids),
                      hidden=True)
    pooled, counts = pool(hidden, jnp.asarray(pool_ids), 1)
    graphdef, params = nnx.split(model.embed_head)
    tx = optax.adam(0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(
            lambda p: cosine_loss(nnx.merge(graphdef, p)(pooled), jnp.asarray(targets)[:, None], counts)[0])(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    for _ in range(60):
        params, opt, loss = step(params, opt)
    nnx.update(model.embed_head, params)
    after = embed_texts(model, tokenizer, texts, batch_size=2)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, rtol=1e-5)
    cos_before, cos_after = (before * targets).sum(1), (after * targets).sum(1)
    # Random 24-d directions have |cos| ~ 0.2; fitted, each text's vector points at its own target.
    assert (cos_after > 0.9).all() and (cos_after > cos_before).all(), (cos_before, cos_after)
