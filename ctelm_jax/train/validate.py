"""A training config checked before any work: the folders it names, its stages, sizes, mesh and batch; a value that
cannot run is a UserError naming the key, the value and the fix."""

from __future__ import annotations

import math

import jax
import ml_collections

from ctelm_jax.concepts import METHODS
from ctelm_jax.errors import UserError, require_folder
from ctelm_jax.models.attention import IMPLEMENTATIONS
from ctelm_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from ctelm_jax.parallel.rules import as_rules, logical_to_spec
from ctelm_jax.run.build import check_model_sources, decoder_config
from ctelm_jax.run.concepts import settings
from ctelm_jax.train.curriculum import Curriculum
from ctelm_jax.train.precision import frozen_dtype

# Keys that count something a run needs at least one of, and keys where 0 switches a feature off.
POSITIVE = ("model.tokens_per_embedding", "data.seq_len", "data.global_batch_size", "data.max_embeddings_per_row",
            "checkpoint.every_steps", "checkpoint.keep", "eval.batches", "log_every")
NON_NEGATIVE = ("model.loss_chunk", "data.max_records", "data.prefetch", "eval.every_steps", "export.every_steps")


def check_sources(config: ml_collections.ConfigDict) -> None:
    """Fails when a model or encoder folder the run needs is unset or missing (UserError)."""
    check_model_sources(config.model)
    if not config.data.embeddings and config.data.encoder != "default":
        require_folder(config.data.encoder, "data.encoder", "config.json",
                       "a sentence-transformers or Hugging Face BERT folder")


def _value(config: ml_collections.ConfigDict, key: str) -> int:
    section, _, name = key.rpartition(".")
    return int((config[section] if section else config)[name])


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises UserError when `config` cannot run on `num_devices` (default: all devices of the run): checked before
    anything is written, so a bad value fails at once with a message instead of mid-run."""
    check_sources(config)
    curriculum = Curriculum(config.stages, list(config.data.tasks))  # stage names, tasks, steps and learning rates
    if float(config.model.get("embed_pred_weight", 0.0)) <= 0:
        for stage in curriculum.stages:
            if "embed" in stage.task_weights:
                raise UserError(f"stage {stage.name!r} trains the embed task but model.embed_pred_weight is "
                                f"{config.model.get('embed_pred_weight', 0.0)} (no embedding-prediction head); set "
                                "--config.model.embed_pred_weight > 0, or drop embed from the stage's tasks.")
    frozen_dtype(config.model)
    attention = str(config.model.get("attention", "auto"))
    if attention not in IMPLEMENTATIONS:
        raise UserError(f"model.attention={attention!r}; choose one of {', '.join(IMPLEMENTATIONS)} "
                        "(--config.model.attention=auto picks splash on TPU, cudnn on GPU, else xla).")
    if attention == "cudnn" and config.model.dtype not in ("bfloat16", "float16"):
        raise UserError(f"model.attention='cudnn' needs a 16-bit compute dtype, not model.dtype="
                        f"{config.model.dtype!r}; set --config.model.dtype=bfloat16 or --config.model.attention=auto.")
    for key in POSITIVE:
        if _value(config, key) <= 0:
            raise UserError(f"{key}={_value(config, key)}: must be positive; set --config.{key} to a number >= 1.")
    for key in NON_NEGATIVE:
        if _value(config, key) < 0:
            raise UserError(f"{key}={_value(config, key)}: must be >= 0 (0 = off / all); set --config.{key}.")
    noise = float(config.data.get("embedding_noise", 0.0))
    if not math.isfinite(noise) or noise < 0:
        raise UserError(f"data.embedding_noise={noise}: must be a finite number >= 0 (a share of the training "
                        "embeddings' spread; 0 = off); set --config.data.embedding_noise, e.g. 0.1.")
    concept_settings = settings(config)
    if concept_settings["method"] not in METHODS:
        raise UserError(f"concepts.method={concept_settings['method']!r}: use one of {', '.join(METHODS)}; set "
                        "--config.concepts.method=centroid or edit_pair.")
    if int(concept_settings["n_trials"]) < 2:
        raise UserError(f"concepts.n_trials={concept_settings['n_trials']}: an edit-pair vector averages at least 2 "
                        "trials (two halves for its stability); set --config.concepts.n_trials, e.g. 200.")
    seq_len = _value(config, "data.seq_len")
    max_positions = decoder_config(config.model).max_position_embeddings
    if seq_len > max_positions:
        raise UserError(f"data.seq_len={seq_len}: longer than the decoder's {max_positions} positions "
                        f"(max_position_embeddings); set --config.data.seq_len <= {max_positions}.")
    shape = dict(zip(MESH_AXES, resolve_mesh_shape(dict(config.mesh), num_devices or jax.device_count())))
    batch_axes = logical_to_spec(("batch",), as_rules(config.rules))[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(shape[a] for a in batch_axes)
    batch = _value(config, "data.global_batch_size")
    if batch % shards:
        axes = " x ".join(f"{a}={shape[a]}" for a in batch_axes)
        raise UserError(f"data.global_batch_size={batch}: not divisible by the {shards} batch shards of the mesh "
                        f"({axes}); set --config.data.global_batch_size to a multiple of {shards}, or change "
                        "config.mesh.")
