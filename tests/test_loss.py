"""The chunked token loss (`train.loss.chunked_nll`): the full-logits loss and gradients within f32 rounding, on its
own and in the ELM's train step (adapter, LoRA, every parameter), and never the whole (B, T, V) logits in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctelm_jax.models.elm import ELM
from ctelm_jax.models.embed_head import EmbedHead
from ctelm_jax.train.loss import chunked_nll, nll
from ctelm_jax.train.optimizer import combine, param_labels, partition
from ctelm_jax.train.step import loss_and_metrics
from tests.test_train_step import CFG, DOMAIN, VOCAB, make_batch, make_model

# f32: each per-token term is the same arithmetic in both paths; the gradients of the head and of shared weights are
# sums over <= 256 tokens in another order, a few ulps (6e-8 each) of their magnitude apart.
RTOL = 1e-5


def assert_close(got, want):
    """Every leaf within RTOL of the reference, relative to the leaf's largest entry (entries near 0 included)."""
    assert got.keys() == want.keys()
    for k in want:
        scale = float(np.max(np.abs(want[k]))) or 1.0
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=RTOL * scale, err_msg=str(k))


def test_nll_is_minus_log_softmax_at_the_target_and_ignores_ids_past_the_vocabulary():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[0, 6, 7], [3, 100, 2]])
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(targets < 7, targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll(logits, targets), want, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 16])  # 3: does not divide T = 10; 16: one chunk, padded
def test_chunked_nll_is_the_full_loss_and_gradients(chunk):
    """Values and gradients w.r.t. the hidden states and the head weight, ids past the vocabulary (V = 50) included."""
    kh, kw, kt = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(kh, (3, 10, 16))
    weight = 0.3 * jax.random.normal(kw, (16, 50))
    targets = jax.random.randint(kt, (3, 10), 0, 60)
    assert (targets >= 50).any()
    mask = (targets < 50).astype(jnp.float32)

    def loss(params, chunked):
        head = lambda h: h @ params["w"]  # noqa: E731
        per_token = chunked_nll(params["h"], head, targets, chunk) if chunked else nll(head(params["h"]), targets)
        return (per_token * mask).sum(), per_token

    params = {"h": hidden, "w": weight}
    (full, full_tokens), full_grads = jax.value_and_grad(loss, has_aux=True)(params, False)
    (value, tokens), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
    assert tokens.shape == (3, 10)
    np.testing.assert_allclose(tokens, full_tokens, rtol=RTOL)
    assert float(value) == pytest.approx(float(full), rel=RTOL)
    assert_close(grads, full_grads)


def elm(cfg=CFG, head=False):
    model = make_model(cfg=cfg)
    if not head:
        return model
    return ELM(model.decoder, model.adapter, model.placeholder_id, EmbedHead(cfg.hidden_size, DOMAIN, 0.5,
                                                                          rngs=nnx.Rngs(3)))


def elm_batch(head=False):
    batch = make_batch()
    b, t = batch["tokens"].shape
    batch["targets"][:, -1] = VOCAB + 2  # an id past the vocabulary (the placeholder of a tokenizer), never scored
    batch["loss_mask"][:, -1] = 0.0
    if head:
        batch["pool_ids"] = np.where(np.arange(t) < 12, 1, 0).repeat(b).reshape(t, b).T.astype(np.int32)
        batch["embed_targets"] = np.random.default_rng(2).standard_normal((b, 2, DOMAIN)).astype(np.float32)
    return batch


@pytest.mark.parametrize("trainable,tied,head", [
    (("adapter",), True, False),
    (("adapter", "lora"), False, False),
    (("adapter", "lora"), True, True),  # the embedding head: the loss starts from hidden states it shares
    (("adapter", "decoder", "lora"), True, False),  # every parameter, the tied head among them
    (("adapter", "decoder"), False, False),  # full fine-tune with a separate lm_head
], ids=["adapter", "lora-untied", "lora-embed-head", "all-tied", "full-untied"])
def test_train_step_loss_and_gradients_match_the_full_logits(trainable, tied, head):
    """loss_and_metrics with loss_chunk 12 (T = 32: 3 chunks, the last padded) and 8 (4 exact chunks) against
    loss_chunk 0: the loss, per-task sums and the gradients of the trained partition, frozen weights closed over."""
    model = elm(CFG.replace(tie_word_embeddings=tied), head)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    train, frozen = partition(params, param_labels(params, trainable))
    batch = elm_batch(head)

    def run(train_flat, chunk):
        def loss(t):
            return loss_and_metrics(nnx.merge(graphdef, combine(t, frozen)), batch, 3, chunk)

        return jax.value_and_grad(loss, has_aux=True)(train_flat)

    run = jax.jit(run, static_argnums=1)
    (full, full_metrics), full_grads = run(train, 0)
    assert float(full) > 0 and len(full_grads) > 0
    for chunk in (12, 8):
        (value, metrics), grads = run(train, chunk)
        assert float(value) == pytest.approx(float(full), rel=RTOL)
        np.testing.assert_allclose(metrics["task_loss_sum"], full_metrics["task_loss_sum"], rtol=RTOL)
        assert_close(grads, full_grads)


def test_compiled_loss_never_holds_the_whole_logits():
    """XLA's temporary memory for the loss and its gradients: the full path holds (B, T, V) float32 logits and their
    gradient; the chunked one less than a single (B, T, V) float32 buffer (its chunks are (B, 32, V), 1/16 of it)."""
    b, t, d, v = 4, 512, 32, 4096
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    weight = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    logits_bytes = b * t * v * 4

    def temp(chunk):
        def loss(h, w, y):
            head = lambda x: x @ w  # noqa: E731
            return (chunked_nll(h, head, y, chunk) if chunk else nll(head(h), y)).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, weight, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp(0), temp(32)
    assert full >= logits_bytes, full
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)
