"""The loss and the compiled train / eval steps over a pure (dict) parameter tree."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ctelm_jax.models.embed_head import cosine_loss, pool
from ctelm_jax.train.loss import chunked_nll, nll
from ctelm_jax.train.optimizer import Params, combine, partition

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a step changes: the step count, all parameters, and the optimizer state of the trainable ones."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


def final_hidden(model: nnx.Module, batch: Batch) -> jax.Array:
    """The decoder's final normed hidden states (B, T, D) of the batch."""
    hidden, _ = model(batch["tokens"], batch["embeddings"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], hidden=True)
    return hidden


def token_losses(model: nnx.Module, batch: Batch, hidden: jax.Array | None = None, loss_chunk: int = 0) -> jax.Array:
    """Per-token negative log-likelihood of `targets` (B, T) under the ELM (from its final `hidden` states if given;
    with `loss_chunk` > 0, from them `loss_chunk` positions at a time: `train.loss.chunked_nll`)."""
    if hidden is None and loss_chunk == 0:
        logits, _ = model(batch["tokens"], batch["embeddings"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
        return nll(logits, batch["targets"])
    hidden = final_hidden(model, batch) if hidden is None else hidden
    decoder = model.decoder

    def head(h: jax.Array) -> jax.Array:
        return decoder.constrain(decoder.logits(h), ("batch", "length", "act_vocab"))

    if loss_chunk == 0:
        return nll(head(hidden), batch["targets"])
    return chunked_nll(hidden, head, batch["targets"], loss_chunk)


def embed_prediction(model: nnx.Module, batch: Batch, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean 1 - cos(predicted, encoder embedding), number of texts) of the batch's `embed` examples."""
    pooled, counts = pool(hidden, batch["pool_ids"], batch["embed_targets"].shape[1])
    return cosine_loss(model.embed_head(pooled), batch["embed_targets"], counts)


def loss_and_metrics(model: nnx.Module, batch: Batch, num_tasks: int,
                     loss_chunk: int = 0) -> tuple[jax.Array, Metrics]:
    """Mean target-token loss (plus the weighted embedding-prediction loss with a head) and, per task, the summed
    loss and token count; `loss_chunk` > 0 computes the token losses that many positions at a time."""
    hidden = final_hidden(model, batch) if model.embed_head is not None else None
    mask = batch["loss_mask"].astype(jnp.float32)
    losses = jnp.where(mask > 0, token_losses(model, batch, hidden, loss_chunk), 0.0)
    tokens = mask.sum()
    loss = (losses * mask).sum() / jnp.maximum(tokens, 1.0)
    onehot = jax.nn.one_hot(batch["task_ids"], num_tasks, dtype=jnp.float32) * mask[..., None]
    metrics = {
        "loss": loss, "target_tokens": tokens,
        "task_loss_sum": jnp.einsum("bt,btk->k", losses, onehot), "task_tokens": onehot.sum((0, 1)),
    }
    if hidden is not None:
        embed_loss, texts = embed_prediction(model, batch, hidden)
        metrics.update(embed_loss=embed_loss, embed_texts=texts)
        loss = loss + model.embed_head.loss_weight * embed_loss
        metrics["loss"] = loss
    return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, labels: Params, tx: optax.GradientTransformation, num_tasks: int,
                    loss_chunk: int = 0) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure step: gradients of the trainable partition only, AdamW on them, frozen leaves passed through untouched
    (`loss_chunk`: `model.loss_chunk`, positions per chunk of the token loss, 0 = all at once)."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        train, frozen = partition(state.params, labels)

        def loss_fn(train_flat):
            model = nnx.merge(graphdef, combine(train_flat, frozen))
            return loss_and_metrics(model, batch, num_tasks, loss_chunk)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        # Frozen leaves get scalar stand-ins: set_to_zero ignores them and they are never applied.
        full_grads = combine(grads, {k: jnp.zeros((), v.dtype) for k, v in frozen.items()})
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        upd_train, _ = partition(updates, labels)
        new_train = {k: (v + upd_train[k].astype(v.dtype)) for k, v in train.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = TrainState(step=state.step + 1, params=combine(new_train, frozen), opt_state=opt_state)
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, num_tasks: int,
                   loss_chunk: int = 0) -> Callable[[Params, Batch], Metrics]:
    """Loss metrics of a batch without updating anything."""

    def step(params: Params, batch: Batch) -> Metrics:
        return loss_and_metrics(nnx.merge(graphdef, params), batch, num_tasks, loss_chunk)[1]

    return step
