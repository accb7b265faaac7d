"""A run's trained ELM: its resolved config and orbax checkpoint restored onto a mesh (decode / eval / explore /
export)."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from ctelm_jax import fs
from ctelm_jax.models.elm import ELM
from ctelm_jax.parallel.mesh import make_mesh
from ctelm_jax.parallel.rules import as_rules, constrainer, state_shardings
from ctelm_jax.run.build import abstract_elm, load_tokenizer
from ctelm_jax.run.checkpoint import abstract_like, restore_params
from ctelm_jax.run.config import load_run_config
from ctelm_jax.weights.tokenizer import Tokenizer


class Trained(NamedTuple):
    """A trained model with everything needed to use it."""

    model: ELM
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    step: int


def run_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The mesh a run is loaded onto by default: every local device, laid out as the run's `mesh` when that fits
    their count, else as one FSDP axis (parameters spread evenly, whatever the count)."""
    devices = jax.local_devices()
    try:
        return make_mesh(dict(config.mesh), devices)
    except ValueError as e:
        logging.info("the run's mesh does not fit %d local devices (%s); loading it FSDP over them", len(devices), e)
        return make_mesh({"fsdp": -1}, devices)


def load_trained(workdir: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None) -> Trained:
    """The ELM of `workdir`'s latest (or given) checkpoint with its tokenizer and config, restored onto `mesh`
    (default: `run_mesh`): parameters sharded and activations laid out by the run's rules, as in training; the
    parameters stay on the devices for every use."""
    config = load_run_config(workdir)
    tokenizer = load_tokenizer(config.model)
    mesh = mesh or run_mesh(config)
    rules = as_rules(config.rules)
    graphdef, abstract = nnx.split(abstract_elm(config.model, tokenizer, constrainer(mesh, rules)))
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh, rules))
    params, step = restore_params(fs.as_path(workdir) / "checkpoints",
                                  abstract_like(nnx.to_pure_dict(abstract), shardings), step)
    return Trained(nnx.merge(graphdef, params), tokenizer, config, step)
