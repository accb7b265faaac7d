"""Loads a trained ELM from a run directory (its resolved config.json + orbax checkpoint) for decode/eval/export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import ml_collections
from flax import nnx

from ctelm_jax.models.build import build_elm, load_tokenizer
from ctelm_jax.models.elm import ELM
from ctelm_jax.train.checkpoint import restore_params
from ctelm_jax.weights.tokenizer import Tokenizer


class Trained(NamedTuple):
    """A trained model with everything needed to use it."""

    model: ELM
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    step: int


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a ctelm_jax run directory (no config.json); pass the --workdir of a run.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_trained(workdir: str | Path, step: int | None = None) -> Trained:
    """The ELM of `workdir`'s latest (or given) checkpoint, on the host, with its tokenizer and config."""
    config = load_run_config(workdir)
    tokenizer = load_tokenizer(config.model)
    model = build_elm(config.model, tokenizer)
    graphdef, state = nnx.split(model)
    params, step = restore_params(Path(workdir) / "checkpoints", nnx.to_pure_dict(state), step)
    return Trained(nnx.merge(graphdef, params), tokenizer, config, step)
