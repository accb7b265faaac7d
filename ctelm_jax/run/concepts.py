"""A run's concept vectors: those saved in its workdir (`concepts.npz` + `concepts.json`), else the built-in concepts
of its training split, computed once and saved with the run, so training's `offset` task, the evaluation and the
explorer all move along the same vectors.

`concepts.method` picks how: `centroid` (ctELM's group centroids' difference) or `edit_pair` (half the mean
difference of `concepts.n_trials` training trials' +1 and -1 edits, embedded with the run's encoder; the edited
texts' embeddings are cached in `<workdir>/embeddings/concept_<name>_<plus|minus>_n<N>_seed<S>` and resume like the
corpus embeddings)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ctelm_jax import concepts, console, fs
from ctelm_jax.data import render
from ctelm_jax.data.embeddings import embed_corpus, embedding_paths, load_embeddings, load_encoder
from ctelm_jax.errors import UserError
from ctelm_jax.run.config import load_run_config
from ctelm_jax.run.corpus import Split, load_splits
from ctelm_jax.vectors import cosine_rows

DEFAULTS = {"method": "centroid", "n_trials": 200}  # the `concepts` section of runs saved before it


def settings(config: ml_collections.ConfigDict | None) -> dict[str, Any]:
    """The run's `concepts` section (method, n_trials) over DEFAULTS; None: DEFAULTS."""
    given = dict(config.get("concepts") or {}) if config is not None else {}
    return {**DEFAULTS, **given}


def _edited_text(row: dict) -> str:
    """The text of a row of edited trials (`embed_corpus`'s text function)."""
    return row["text"]


@dataclasses.dataclass(frozen=True)
class EditPairs:
    """One concept's edited training trials: split rows `rows`, and the encoder's embeddings of their canonical texts
    moved to +1 (`plus`) and -1 (`minus`) along the concept (`render.move_fields`)."""

    rows: list[int]
    plus: np.ndarray
    minus: np.ndarray


def edit_embeddings(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                    train: Split) -> dict[str, EditPairs]:
    """Per built-in concept, the edit pairs of `concepts.n_trials` training trials (drawn with `data.seed`), embedded
    with the run's encoder once and cached in `<workdir>/embeddings` (resumable; a set of other trials is embedded
    again in its place)."""
    if config.data.embeddings == "random":
        raise UserError("edit-pair concept vectors and the counterfactual task embed edited trial texts with the "
                        "run's encoder, but the run trains on random embeddings (data.embeddings='random'); set "
                        "--config.concepts.method=centroid and leave counterfactual out of the stages' tasks.")
    n, seed = int(settings(config)["n_trials"]), int(config.data.seed)
    fields = concepts.as_fields(train.records)  # rendered once for every edit
    encoder, clock, out = None, time.perf_counter(), {}
    for name in concepts.BUILTIN:
        picked, plus, minus = concepts.edit_pairs(
            name, fields, lambda f, a, c=name: render.move_fields(f, c, a), n, seed)
        ids, embedded = [train.records[i]["nctid"] for i in picked], []
        for sign, texts in (("plus", plus), ("minus", minus)):
            source = fs.as_path(workdir) / "embeddings" / f"concept_{name}_{sign}_n{n}_seed{seed}"
            if not all(p.is_file() for p in embedding_paths(source)) or load_embeddings(source)[0] != ids:
                encoder = encoder or load_encoder(config.data.encoder)
                embed_corpus([{"nctid": i, "text": t} for i, t in zip(ids, texts)], encoder, source,
                             text_fn=_edited_text)
            embedded.append(load_embeddings(source, expected_dim=int(config.model.domain_dim))[1])
        out[name] = EditPairs(picked, *embedded)
    if encoder is not None:
        console.say(f"edited trials: {n} per concept and sign embedded in {time.perf_counter() - clock:.0f} s")
    return out


def edit_pair_builtins(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                       train: Split) -> dict[str, concepts.Concept]:
    """The built-in concepts as edit pairs of `concepts.n_trials` training trials (`edit_embeddings`), each with the
    cosine to its centroid vector in `stats`."""
    centroid = concepts.builtin(train.records, train.embeddings)
    out = {}
    for name, pairs in edit_embeddings(workdir, config, train).items():
        c = concepts.from_edit_pairs(name, pairs.plus, pairs.minus, f"{name} edit (render.move_fields +1 minus -1, "
                                     f"halved); was: {concepts.BUILTIN[name][2]}")
        to_centroid = float(cosine_rows(c.vector[None], centroid[name].vector[None])[0])
        out[name] = dataclasses.replace(c, stats={**c.stats, "cosine_to_centroid": to_centroid})
    stability = ", ".join(f"{k} {c.stats['split_half_cosine']:.2f}" for k, c in out.items())
    console.say(f"concept vectors: edit pairs of {settings(config)['n_trials']} training trials each, split-half "
                f"cosine {stability}")
    return out


def compute(workdir: str | os.PathLike, train: Split | None = None,
            config: ml_collections.ConfigDict | None = None) -> dict[str, concepts.Concept]:
    """The built-in concepts of the run's training split by `config`'s `concepts.method` (the run's config and split,
    read from the workdir, when neither is given; a split without a config: centroid), saved with the run by
    process 0. Too few trials in a group or an edit raise `concepts`' errors."""
    if train is None:
        config = config or load_run_config(workdir)
        train = load_splits(config, workdir)["train"]
    if settings(config)["method"] == "edit_pair":
        found = edit_pair_builtins(workdir, config, train)
    else:
        found = concepts.builtin(train.records, train.embeddings)
    if jax.process_index() == 0:
        concepts.save(workdir, found, source="train split")
    return found


def load_or_compute(workdir: str | os.PathLike, train: Split | None = None,
                    config: ml_collections.ConfigDict | None = None) -> tuple[dict[str, concepts.Concept], str]:
    """The run's concept vectors and a note saying where they came from and how they were made: the saved ones,
    else `compute`'s."""
    workdir = fs.as_path(workdir)
    if concepts.saved(workdir):
        found, how = concepts.load(workdir), "loaded from"
    else:
        found, how = compute(workdir, train, config), "computed from the training split and saved to"
    methods = sorted({c.method for c in found.values()})
    return found, f"{how} {workdir / concepts.NPZ} (method: {', '.join(methods)})"
