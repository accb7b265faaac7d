"""A curriculum stage's jitted train step with its labels, optimizer and shardings: built once, for the training loop,
the sizing tool's XLA check and the ahead-of-time TPU compiler check (`ctelm_jax.aot`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctelm_jax.run.checkpoint import abstract_like
from ctelm_jax.train.curriculum import Stage
from ctelm_jax.train.optimizer import Params, make_optimizer, param_labels
from ctelm_jax.train.step import TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class StageStep:
    """What a stage trains with: labels, optimizer, the shardings of its TrainState, and the jitted step."""

    labels: Params
    tx: optax.GradientTransformation
    abstract_opt: Any
    opt_shardings: Any
    shardings: TrainState
    step: Callable

    def abstract_state(self, params: Params) -> TrainState:
        """The TrainState as ShapeDtypeStructs with their shardings (a restore target, or a compile-only input)."""
        replicated = self.shardings.step
        return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                          params=abstract_like(params, self.shardings.params),
                          opt_state=abstract_like(self.abstract_opt, self.opt_shardings))


def stage_step(graphdef: nnx.GraphDef, params: Params, param_shardings: Params, stage: Stage, num_tasks: int,
               mesh: Mesh, loss_chunk: int = 0) -> StageStep:
    """The stage's train step over `params` (arrays or ShapeDtypeStructs), state donated, as the loop runs it
    (`loss_chunk`: `model.loss_chunk`).

    Optimizer moments take their parameter's sharding; the rest of the optimizer state (counts) is replicated.
    """
    labels = param_labels(params, stage.trainable)
    tx = make_optimizer(labels, stage.schedule(), weight_decay=stage.weight_decay)
    abstract_opt = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_shardings = optax.tree_map_params(tx, lambda v, s: v if is_masked(v) else s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated, is_leaf=is_masked)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    step = jax.jit(make_train_step(graphdef, labels, tx, num_tasks, loss_chunk),
                   in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    return StageStep(labels=labels, tx=tx, abstract_opt=abstract_opt, opt_shardings=opt_shardings,
                     shardings=shardings, step=step)
