"""A run's corpus: its records split by NCT id with their embeddings (loaded, computed once into the workdir, or random
for tests), and the frozen sentence encoder that made them."""

from __future__ import annotations

import os
from typing import NamedTuple

import ml_collections
import numpy as np
from absl import logging

from ctelm_jax import console, fs
from ctelm_jax.data.corpus import load_records, split_of
from ctelm_jax.data.embeddings import embed_corpus, embedding_paths, load_embeddings, load_encoder
from ctelm_jax.data.render import render_text
from ctelm_jax.rerank import Encode
from ctelm_jax.weights.default import encoder_dir

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


def load_splits(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Split]:
    """Records of the corpus split by NCT id, with their embeddings."""
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


def run_encoder(config: ml_collections.ConfigDict) -> tuple[Encode | None, str]:
    """The run's frozen sentence encoder as a function, or None (with the reason) when the run used random vectors."""
    if config.data.embeddings == "random":
        return None, "the run was trained on random embeddings (data.embeddings='random'): no encoder to re-embed with"
    from ctelm_jax.encoders.bert import SentenceEncoder

    path = encoder_dir(config.data.encoder)
    encoder = SentenceEncoder.from_dir(path)
    if encoder.dim != int(config.model.domain_dim):
        return None, f"encoder {path} gives {encoder.dim}-d vectors but the model takes {config.model.domain_dim}-d"
    return encoder.encode, f"{path} ({encoder.dim}-d, frozen)"
