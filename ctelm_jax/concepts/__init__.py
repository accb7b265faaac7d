"""Concept vectors: directions in the sentence encoder's embedding space, each the difference of two centroids.

A concept is `mean(embeddings of records with the attribute) - mean(embeddings of records without it)`, the two
groups picked by filters over `render.fields`. Built-in concepts, defined from what the shipped corpus supports
(training split, 4,021 trials; counts are recomputed and saved with the vectors):

  age        min age >= 60 (`render.is_older_adult`; 52 trials, only 30 at >= 65, hence 60) minus adult trials that
             exclude older adults (min age >= 18 and max age < 60; 197). Comparing with every other trial would mostly
             measure "states an age range at all" (~75% state none), and with trials open to all adults (1,925) it
             would not separate the upper bound; adults capped below 60 are the trials the concept flips.
  pediatric  children only (max age < 18, `render.is_pediatric`; 77) minus adults only (min age >= 18; 1,977).
  sex        women only (`render.is_female_only`; 282) minus men only (`render.is_male_only`; 177).

Positive strengths move towards the first group (older / children / women). `apply` adds `strength * vector` and
renormalises to unit L2 norm, because the encoder (all-MiniLM-L6-v2) L2-normalises every embedding and the model was
trained only on unit vectors. Vectors are saved with the run as `<workdir>/concepts.npz` (one array per name) and
`<workdir>/concepts.json` (definitions and group sizes); `ctelm_jax.run.concepts` computes a run's from its training
split, and `python -m ctelm_jax.concepts --workdir=<run>` writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np
from etils import epath

from ctelm_jax import fs
from ctelm_jax.data import render
from ctelm_jax.data.render import TrialFields
from ctelm_jax.errors import MissingInput

NPZ, JSON = "concepts.npz", "concepts.json"
Filter = Callable[[TrialFields], bool]


@dataclasses.dataclass(frozen=True)
class Concept:
    """A named direction with the sizes of the two groups it was computed from."""

    name: str
    vector: np.ndarray  # float32 (d,)
    positive: int
    negative: int
    description: str = ""


def is_adult_under_60(f: TrialFields) -> bool:
    """Adults whose stated maximum age is below the older-adult threshold (the age concept's negative group)."""
    return f.min_age is not None and f.min_age >= render.ADULT_AGE and f.max_age is not None and \
        f.max_age < render.OLDER_ADULT_MIN_AGE


def is_adult_only(f: TrialFields) -> bool:
    """Adults only: minimum age >= 18 (the pediatric concept's negative group)."""
    return f.min_age is not None and f.min_age >= render.ADULT_AGE


BUILTIN: dict[str, tuple[Filter, Filter, str]] = {
    "age": (render.is_older_adult, is_adult_under_60,
            f"min age >= {render.OLDER_ADULT_MIN_AGE:g} minus adults with max age < {render.OLDER_ADULT_MIN_AGE:g}"),
    "pediatric": (render.is_pediatric, is_adult_only, "max age < 18 minus min age >= 18"),
    "sex": (render.is_female_only, render.is_male_only, "women only minus men only"),
}


def as_fields(records: Sequence[Mapping | TrialFields]) -> list[TrialFields]:
    """Fields of corpus records (TrialFields pass through)."""
    return [r if isinstance(r, TrialFields) else render.fields(r) for r in records]


def define(name: str, records: Sequence[Mapping | TrialFields], embeddings: np.ndarray, positive_fn: Filter,
           negative_fn: Filter, description: str = "") -> Concept:
    """centroid(embeddings where positive_fn) - centroid(embeddings where negative_fn); filters see `render.fields`."""
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(records):
        raise ValueError(f"concept {name!r}: {len(records)} records but embeddings of shape {embeddings.shape}; "
                         "give one row per record.")
    fields = as_fields(records)
    pos = np.array([bool(positive_fn(f)) for f in fields])
    neg = np.array([bool(negative_fn(f)) for f in fields])
    if (pos & neg).any():
        raise ValueError(f"concept {name!r}: {int((pos & neg).sum())} records pass both filters; the two groups "
                         "must be disjoint.")
    if not pos.any() or not neg.any():
        raise ValueError(f"concept {name!r}: {int(pos.sum())} records with and {int(neg.sum())} without the "
                         "attribute; each group needs at least one record.")
    vector = embeddings[pos].mean(axis=0) - embeddings[neg].mean(axis=0)
    return Concept(name, vector.astype(np.float32), int(pos.sum()), int(neg.sum()), description)


def builtin(records: Sequence[Mapping | TrialFields], embeddings: np.ndarray) -> dict[str, Concept]:
    """The built-in concepts (age, pediatric, sex) of a record set (fields computed once)."""
    fields = as_fields(records)
    return {name: define(name, fields, embeddings, pos, neg, desc) for name, (pos, neg, desc) in BUILTIN.items()}


def apply(embedding: np.ndarray, vector: np.ndarray, strength: float) -> np.ndarray:
    """embedding + strength * vector, renormalised to unit L2 norm (the encoder's embeddings are unit vectors)."""
    moved = np.asarray(embedding, np.float32) + np.float32(strength) * np.asarray(vector, np.float32)
    norm = np.linalg.norm(moved, axis=-1, keepdims=True)
    if not np.all(norm > 0):
        raise ValueError(f"moving by strength {strength} cancels the embedding (zero vector); use another strength.")
    return (moved / norm).astype(np.float32)


def save(workdir: str | os.PathLike, concepts: Mapping[str, Concept], source: str = "") -> epath.Path:
    """Writes `<workdir>/concepts.npz` and `<workdir>/concepts.json`; returns the .npz path."""
    workdir = fs.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / NPZ).open("wb") as f:
        np.savez(f, **{name: c.vector for name, c in concepts.items()})
    meta = {name: {"positive": c.positive, "negative": c.negative, "description": c.description,
                   "norm": float(np.linalg.norm(c.vector))} for name, c in concepts.items()}
    (workdir / JSON).write_text(json.dumps({"source": source, "concepts": meta}, indent=1) + "\n")
    return workdir / NPZ


def saved(workdir: str | os.PathLike) -> bool:
    """Whether concept vectors are saved in `workdir` (both files)."""
    workdir = fs.as_path(workdir)
    return (workdir / NPZ).is_file() and (workdir / JSON).is_file()


def load(workdir: str | os.PathLike) -> dict[str, Concept]:
    """The concepts saved with a run; FileNotFoundError says how to make them."""
    workdir = fs.as_path(workdir)
    if not saved(workdir):
        raise MissingInput(f"{workdir}: no concept vectors ({NPZ} + {JSON}); compute them with "
                                f"`python -m ctelm_jax.concepts --workdir={workdir}` (or run the evaluation).")
    meta = json.loads((workdir / JSON).read_text())["concepts"]
    with (workdir / NPZ).open("rb") as f, np.load(f) as arrays:
        return {name: Concept(name, arrays[name].astype(np.float32), m["positive"], m["negative"], m["description"])
                for name, m in meta.items()}
