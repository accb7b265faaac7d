"""Sentence-transformers pooling: masked mean or CLS token, optional L2 normalisation, and its config file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from ctelm_jax.errors import MissingInput

POOLING_MODES = ("mean", "cls")
_LEGACY_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the token states where `mask` is 1: (B, T, D), (B, T) -> (B, D), as sentence-transformers."""
    m = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def cls_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The first token's state (the [CLS] token): (B, T, D) -> (B, D)."""
    del mask
    return hidden[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool(hidden: jax.Array, mask: jax.Array, mode: str, normalize: bool) -> jax.Array:
    """Pools token states into one vector per row with `mode` ('mean' or 'cls'), then L2-normalises if asked."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported; choose one of {POOLING_MODES}.")
    out = (mean_pool if mode == "mean" else cls_pool)(hidden.astype(jnp.float32), mask)
    return l2_normalize(out) if normalize else out


def read_pooling_mode(pooling_dir: str | os.PathLike) -> str:
    """The pooling mode ('mean' or 'cls') in a sentence-transformers `Pooling` folder's `config.json`."""
    path = Path(pooling_dir) / "config.json"
    if not path.is_file():
        raise MissingInput(f"{path}: missing; a sentence-transformers Pooling module keeps its mode there.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if isinstance(cfg.get("pooling_mode"), str):
        modes = [cfg["pooling_mode"]]
    else:
        modes = [mode for flag, mode in _LEGACY_FLAGS.items() if cfg.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{path}: pooling {modes or 'none'} is not supported; ctelm_jax pools with exactly one of {POOLING_MODES}."
        )
    return modes[0]
