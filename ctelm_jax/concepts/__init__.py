"""Concept vectors: directions in the sentence encoder's embedding space, each the difference of two centroids or of
edited trials' embeddings.

A centroid concept (ctELM's) is `mean(embeddings of records with the attribute) - mean(embeddings of records without it)`, the two
groups picked by filters over `render.fields`. Built-in concepts, defined from what the shipped corpus supports
(training split, 4,021 trials; counts are recomputed and saved with the vectors):

  age        min age >= 60 (`render.is_older_adult`; 52 trials, only 30 at >= 65, hence 60) minus adult trials that
             exclude older adults (min age >= 18 and max age < 60; 197). Comparing with every other trial would mostly
             measure "states an age range at all" (~75% state none), and with trials open to all adults (1,925) it
             would not separate the upper bound; adults capped below 60 are the trials the concept flips.
  pediatric  children only (max age < 18, `render.is_pediatric`; 77) minus adults only (min age >= 18; 1,977).
  sex        women only (`render.is_female_only`; 282) minus men only (`render.is_male_only`; 177).

Positive strengths move towards the first group (older / children / women).

Edit-pair concepts (`from_edit_pairs`, `edit_pairs`) measure the attribute itself instead: N trials are rendered twice,
edited one way and the other (`render.move_fields` at +1 and -1 for the built-ins, or any user `Edit`), both texts are
embedded with the run's encoder, and the vector is half the mean paired difference. Strength +1 is then the mean
move from a trial's own text to its +1 edit (sex: "all" -> "female"), -1 to its -1 edit, as `offset` training
pairs them. Centroid differences also carry what else differs between the groups (women-only minus men-only trials
is largely breast / ovarian minus prostate cancer); edit pairs differ only in the edit.

`apply` adds `strength * vector` and renormalises to unit L2 norm, because the encoder (all-MiniLM-L6-v2)
L2-normalises every embedding and the model was trained only on unit vectors. Vectors are saved with the run as
`<workdir>/concepts.npz` (one array per name) and `<workdir>/concepts.json` (definitions, group sizes, method, norm and
an edit pair's stats); `ctelm_jax.run.concepts` computes a run's from its training split (`concepts.method`), and
`python -m ctelm_jax.concepts --workdir=<run>` writes them.
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
from ctelm_jax.errors import MissingInput, UserError
from ctelm_jax.vectors import cosine_rows

NPZ, JSON = "concepts.npz", "concepts.json"
Filter = Callable[[TrialFields], bool]
Edit = Callable[[TrialFields, float], TrialFields]  # a trial edited one way (+1) or the other (-1)
METHODS = ("centroid", "edit_pair")


@dataclasses.dataclass(frozen=True)
class Concept:
    """A named direction with the sizes of the two groups it was computed from."""

    name: str
    vector: np.ndarray  # float32 (d,)
    positive: int  # trials in the positive group (edit pairs: the pairs)
    negative: int
    description: str = ""
    method: str = "centroid"
    stats: Mapping[str, float] = dataclasses.field(default_factory=dict)  # edit pairs: split-half cosine, ...


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


def edit_pairs(name: str, records: Sequence[Mapping | TrialFields], edit: Edit, n: int,
               seed: int = 0) -> tuple[list[int], list[str], list[str]]:
    """The first n records, in an order drawn with `seed`, whose canonical text `edit` changes, with their +1 and -1
    texts; a UserError naming the concept, the count and `concepts.n_trials` when fewer than n change."""
    if n < 2:
        raise ValueError(f"concept {name!r}: n={n}; an edit-pair vector averages n >= 2 trials.")
    fields = as_fields(records)
    picked: list[int] = []
    plus: list[str] = []
    minus: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(fields)).tolist():
        p, m = render.render_fields(edit(fields[i], 1.0)), render.render_fields(edit(fields[i], -1.0))
        if p != m:
            picked.append(i), plus.append(p), minus.append(m)
            if len(picked) == n:
                return picked, plus, minus
    fix = (f"set --config.concepts.n_trials={len(picked)} or lower" if len(picked) >= 2 else
           "an edit must change at least 2 trials' text; check the edit")
    raise UserError(f"concept {name!r}: its edit changes {len(picked)} of {len(fields)} training trials, fewer than "
                    f"the {n} its vector is averaged over; {fix}, or use --config.concepts.method=centroid.")


def from_edit_pairs(name: str, plus: np.ndarray, minus: np.ndarray, description: str = "") -> Concept:
    """Half the mean of the paired differences `plus - minus` (row i: one trial's +1 and -1 edits, embedded), with
    `stats`: the cosine between the vectors of two disjoint halves of the pairs (stability) and the mean
    |plus - minus|."""
    plus, minus = np.asarray(plus, np.float64), np.asarray(minus, np.float64)
    if plus.shape != minus.shape or plus.ndim != 2 or len(plus) < 2:
        raise ValueError(f"concept {name!r}: paired embeddings of shapes {plus.shape} and {minus.shape}; give two "
                         "(n, d) arrays, n >= 2.")
    half = (plus - minus) / 2
    halves = np.stack([half[0::2].mean(axis=0)]), np.stack([half[1::2].mean(axis=0)])
    stats = {"split_half_cosine": float(cosine_rows(*halves)[0]),
             "mean_edit_norm": float(np.linalg.norm(plus - minus, axis=1).mean())}
    return Concept(name, half.mean(axis=0).astype(np.float32), len(plus), len(plus), description, "edit_pair", stats)


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
                   "norm": float(np.linalg.norm(c.vector)), "method": c.method, "stats": dict(c.stats)}
            for name, c in concepts.items()}
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
        return {name: Concept(name, arrays[name].astype(np.float32), m["positive"], m["negative"], m["description"],
                              m.get("method", "centroid"), m.get("stats", {}))  # runs saved before the keys: centroid
                for name, m in meta.items()}
