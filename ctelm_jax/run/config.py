"""A run's resolved config: written into its workdir when training starts, read back by everything that uses the run."""

from __future__ import annotations

import json
import os

import ml_collections

from ctelm_jax import fs
from ctelm_jax.errors import MissingInput

CONFIG = "config.json"


def save_run_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config into the workdir (the caller picks the one process that writes)."""
    (fs.as_path(workdir) / CONFIG).write_text(config.to_json_best_effort(indent=2))


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    path = fs.as_path(workdir) / CONFIG
    if not path.is_file():
        raise MissingInput(f"{path}: not a ctelm_jax run directory (no config.json); pass the --workdir of a run.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
