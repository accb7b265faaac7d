"""Embeds a trial corpus with a sentence encoder, data-parallel over all devices, resumably.

    python -m ctelm_jax.embed --corpus=data/clinical_trials.jsonl.gz --out=runs/embeddings/minilm

writes runs/embeddings/minilm.npy (+ .ids.json, .meta.json); rerun the same command after an interruption to
continue from runs/embeddings/minilm.partial/. `--encoder` takes any sentence-transformers / HF BERT folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh

from ctelm_jax.encoders.bert import SentenceEncoder

DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"

FLAGS = flags.FLAGS
flags.DEFINE_string("corpus", "data/clinical_trials.jsonl.gz", "Trial records, .jsonl or .jsonl.gz.")
flags.DEFINE_string("out", "runs/embeddings/minilm", "Output stem: writes <out>.npy, <out>.ids.json, <out>.meta.json.")
flags.DEFINE_string("encoder", None, "Encoder folder (sentence-transformers or HF BERT); default: the embedded "
                    "all-MiniLM-L6-v2.")
flags.DEFINE_string("encoder_name", None, "Name recorded in the metadata; default: the folder name "
                    f"({DEFAULT_ENCODER_NAME} for the embedded default).")
flags.DEFINE_integer("batch_size", 64, "Texts per forward pass (rounded up to a multiple of the device count).")
flags.DEFINE_integer("chunk_size", None, "Records per resumable chunk; default 8 batches.")
flags.DEFINE_integer("max_length", None, "Token limit per text; default: the encoder's max_seq_length.")


def load_encoder(encoder_dir: str | None, name: str | None = None, max_length: int | None = None) -> SentenceEncoder:
    """The encoder at `encoder_dir` (default: embedded all-MiniLM-L6-v2), its batches split over all devices."""
    if not encoder_dir:
        from ctelm_jax.weights.default import default_encoder_dir

        encoder_dir, name = default_encoder_dir(), name or DEFAULT_ENCODER_NAME
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    return SentenceEncoder.from_dir(encoder_dir, max_length=max_length, mesh=mesh, name=name)


def main(argv: Sequence[str]) -> None:
    """Loads records and encoder, then runs `data.embeddings.embed_corpus` over a 1-D mesh of all devices."""
    del argv
    from ctelm_jax.data.corpus import load_records
    from ctelm_jax.data.embeddings import embed_corpus
    from ctelm_jax.data.render import render_text

    encoder = load_encoder(FLAGS.encoder, FLAGS.encoder_name, FLAGS.max_length)
    records = load_records(FLAGS.corpus)
    logging.info("embedding %d records with %s (dim %d) on %d device(s)", len(records), encoder.name, encoder.dim,
                 encoder.num_shards)
    path = embed_corpus(records, encoder, FLAGS.out, render_text, FLAGS.batch_size, FLAGS.chunk_size)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    app.run(main)
