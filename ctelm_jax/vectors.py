"""Operations on embedding vectors shared by every layer that compares them (re-ranking, retrieval, the evaluation,
the explorer): the cosine of matching rows and the nearest other row of a pool."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of a and b (N, d) -> (N,); 0 for a zero row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine of rows needs equal shapes, got {a.shape} and {b.shape}.")
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(norms > 0, (a * b).sum(-1) / np.where(norms > 0, norms, 1.0), 0.0)


def nearest_neighbours(queries: np.ndarray, pool: np.ndarray, query_ids: Sequence[str],
                       pool_ids: Sequence[str]) -> np.ndarray:
    """Index into `pool` of each query's most cosine-similar row, never a row with the query's own id."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    p = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    sims = q @ p.T
    own = np.asarray(query_ids)[:, None] == np.asarray(pool_ids)[None, :]
    sims = np.where(own, -np.inf, sims)
    if np.isinf(sims).all(axis=1).any():
        raise ValueError("a query has no neighbour other than itself; the pool needs at least one other record.")
    return np.argmax(sims, axis=1)
