"""What a training run reads: corpus records by split, their embeddings (loaded, computed once, or random for tests),
the concept vectors of the `offset` task, and the batch iterators of each curriculum stage."""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from ctelm_jax import concepts, console, fs
from ctelm_jax.data import pipeline, tasks
from ctelm_jax.data.corpus import load_records, split_of
from ctelm_jax.data.embeddings import embed_corpus, embedding_paths, load_embeddings, load_encoder
from ctelm_jax.data.render import render_text
from ctelm_jax.errors import UserError
from ctelm_jax.models.adapter import standardisation
from ctelm_jax.train.curriculum import Curriculum, Stage
from ctelm_jax.weights.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")


class Split(NamedTuple):
    """The records of one split and their embeddings, row-aligned."""

    records: list[dict]
    embeddings: np.ndarray


def corpus_embeddings(config: ml_collections.ConfigDict, workdir: str | os.PathLike, records: list[dict]) -> np.ndarray:
    """Embeddings row-aligned with `records`: random (tests), from a file, or computed once into the workdir (all
    processes embed, on their own devices; process 0 writes the file, which every process then reads)."""
    dim = int(config.model.domain_dim)
    source = config.data.embeddings
    if source == "random":
        rng = np.random.default_rng(int(config.data.seed))
        e = rng.standard_normal((len(records), dim)).astype(np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    if not source:
        source = fs.as_path(workdir) / "embeddings" / "corpus"
        if not all(p.is_file() for p in embedding_paths(source)):
            encoder = load_encoder(config.data.encoder)
            if encoder.dim != dim:
                raise ValueError(f"encoder {encoder.name} gives {encoder.dim}-d embeddings but model.domain_dim={dim}; "
                                 f"set --config.model.domain_dim={encoder.dim}.")
            console.say(f"embedding: {len(records)} trials with {encoder.name} into {source} (once per workdir)")
            embed_corpus(records, encoder, source, text_fn=render_text)
    ids, array, _ = load_embeddings(source, expected_dim=dim)
    row = {nctid: i for i, nctid in enumerate(ids)}
    missing = [r["nctid"] for r in records if r["nctid"] not in row]
    if missing:
        raise ValueError(f"{source}: no embedding for {len(missing)} records (e.g. {missing[:3]}); "
                         "re-run `python -m ctelm_jax.embed` on this corpus.")
    return array[[row[r["nctid"]] for r in records]]


def load_splits(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                tokenizer: Tokenizer) -> dict[str, Split]:
    """Records of the corpus split by NCT id, with their embeddings."""
    del tokenizer
    records = load_records(config.data.corpus)
    if config.data.max_records:
        records = records[: int(config.data.max_records)]
    embeddings = corpus_embeddings(config, workdir, records)
    out = {}
    for name in SPLITS:
        idx = [i for i, r in enumerate(records) if split_of(r["nctid"]) == name]
        out[name] = Split([records[i] for i in idx], embeddings[idx])
    logging.info("corpus: %s", {k: len(v.records) for k, v in out.items()})
    if not out["train"].records:
        raise ValueError(f"{config.data.corpus}: no training records after splitting; is max_records too small?")
    return out


def offset_vectors(curriculum: Curriculum, workdir: str | os.PathLike, train: Split) -> np.ndarray | None:
    """The `offset` task's concept vectors (rows in `tasks.OFFSET_CONCEPTS` order), or None when no stage trains it:
    those saved with the run (`<workdir>/concepts.npz`), else the built-in concepts of the training split, computed
    and saved (process 0) at the start of the run, so the evaluation moves along the vectors the run learnt."""
    if not any("offset" in s.task_weights for s in curriculum.stages):  # the curriculum keeps weights > 0 only
        return None
    workdir = fs.as_path(workdir)
    if (workdir / concepts.NPZ).is_file() and (workdir / concepts.JSON).is_file():
        found = concepts.load(workdir)
    else:
        try:
            found = concepts.builtin(train.records, train.embeddings)
        except ValueError as e:
            raise UserError(f"the offset task moves embeddings along concept vectors of the training split, and {e} "
                            "Train on more records (--config.data.max_records=0: all), or drop offset from the "
                            "stages' tasks.") from e
        if jax.process_index() == 0:
            concepts.save(workdir, found, source="train split")
    missing = [name for name in tasks.OFFSET_CONCEPTS if name not in found]
    if missing:
        raise ValueError(f"{workdir / concepts.NPZ} has no vector for {missing}; move it away so that the run "
                         "computes the built-in concepts again.")
    return np.stack([found[name].vector for name in tasks.OFFSET_CONCEPTS])


def _make(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, weights: dict[str, float],
          seed: int, concept_vectors: np.ndarray | None, noise_std: float = 0.0, prefetch: int = 0) -> Any:
    # Every configured task keeps its index (task_ids follow config.data.tasks); unused ones get weight 0.
    ordered = {t: float(weights.get(t, 0.0)) for t in config.data.tasks}
    return pipeline.make_pipeline(
        split.records, split.embeddings, tokenizer, ordered, seq_len=int(config.data.seq_len),
        batch_size=int(config.data.global_batch_size), seed=seed,
        max_embeddings_per_row=int(config.data.max_embeddings_per_row), embedding_dim=int(config.model.domain_dim),
        concept_vectors=concept_vectors, noise_std=noise_std, prefetch=prefetch)


def train_batches(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, stage: Stage,
                  seed: int, concept_vectors: np.ndarray | None = None) -> Any:
    """The stage's endless, checkpointable iterator of this host's rows of each global batch; input embeddings get
    noise of `data.embedding_noise` times the training split's spread (the adapter's scale) per dimension."""
    noise = float(config.data.get("embedding_noise", 0.0))
    noise_std = noise * float(standardisation(split.embeddings)[1][0]) if noise > 0 else 0.0
    return _make(config, split, tokenizer, stage.task_weights, seed, concept_vectors, noise_std,
                 prefetch=int(config.data.get("prefetch", 0)))


def eval_batches(config: ml_collections.ConfigDict, split: Split, tokenizer: Tokenizer, stage: Stage,
                 concept_vectors: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A fixed set of validation batches for the stage's tasks (same seed every time, no noise)."""
    it = _make(config, split, tokenizer, stage.task_weights, seed=12345, concept_vectors=concept_vectors)
    for _ in range(int(config.eval.batches)):
        yield next(it)
