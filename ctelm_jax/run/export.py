"""A run's exports: a checkpoint of the run as an ELM folder (`weights.elm_export`'s layout) with the run's encoder
name, concept vectors and embedding metadata; `python -m ctelm_jax.export` for any step, `maybe_export` every
`export.every_steps` steps of training."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ctelm_jax import fs
from ctelm_jax.run.trained import load_trained
from ctelm_jax.weights.default import ENCODER_NAME
from ctelm_jax.weights.elm_export import DEFAULT_MAX_SHARD_BYTES, check_target, export_elm
from ctelm_jax.weights.tokenizer import Tokenizer


def run_extras(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int,
) -> tuple[dict[str, Any], dict[str, epath.Path]]:
    """(extra config.json fields, extra files) of a run's step: encoder name, concept vectors, embedding metadata."""
    workdir = fs.as_path(workdir)
    files = {f"embeddings/{p.name}": p for p in sorted((workdir / "embeddings").glob("*meta*.json"))}
    if (workdir / "concepts.npz").is_file():
        files["concepts.npz"] = workdir / "concepts.npz"
    names = []
    for path in files.values():
        if path.suffix == ".json":
            with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
                names.append(json.loads(path.read_text()).get("encoder"))
    encoder = next((n for n in names if n), None)
    if encoder is None:
        configured = str(config.data.encoder)
        encoder = ENCODER_NAME if configured == "default" else Path(configured).name
    return {"encoder": encoder, "ctelm_step": int(step)}, files


def export_run(
    workdir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, lora: str = "merge",
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> epath.Path:
    """Exports a run's latest (or given) checkpoint as an ELM folder with its encoder name and concept vectors."""
    check_target(out_dir, overwrite)
    trained = load_trained(workdir, step)
    extra_config, extra_files = run_extras(trained.config, workdir, trained.step)
    return export_elm(trained.model, trained.tokenizer, out_dir, lora, extra_config, extra_files, overwrite,
                      max_shard_bytes)


def maybe_export(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int, graphdef: nnx.GraphDef,
    params: Any, tokenizer: Tokenizer,
) -> epath.Path | None:
    """Every `config.export.every_steps` steps, exports the training params to `<export.dir or workdir/export>/step_N`.

    Call it on every process (parameters are gathered across hosts); process 0 writes. Returns the folder or None.
    """
    every = int(config.export.every_steps)
    if not every or step % every:
        return None
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    if jax.process_index() != 0:
        return None
    out = fs.as_path(config.export.get("dir") or fs.as_path(workdir) / "export") / f"step_{step}"
    extra_config, extra_files = run_extras(config, workdir, step)
    path = export_elm(nnx.merge(graphdef, params), tokenizer, out, config.export.get("lora", "merge"), extra_config,
                      extra_files, overwrite=True)
    logging.info("exported step %d to %s", step, path)
    return path
