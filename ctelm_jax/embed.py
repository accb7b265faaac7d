"""Embeds a trial corpus with a sentence encoder, data-parallel over all devices, resumably.

    python -m ctelm_jax.embed --corpus=data/clinical_trials.jsonl.gz --out=runs/embeddings/minilm

writes runs/embeddings/minilm.npy (+ .ids.json, .meta.json); rerun the same command after an interruption to
continue from runs/embeddings/minilm.partial/. `--encoder` takes any sentence-transformers / HF BERT folder.
Started on every host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (as the launch/
scripts do for training), the processes split every chunk between them; process 0 writes the files.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags, logging

from ctelm_jax import console
from ctelm_jax.data.corpus import load_records
from ctelm_jax.data.embeddings import embed_corpus, load_encoder
from ctelm_jax.data.render import render_text
from ctelm_jax.parallel.distributed import maybe_initialize_distributed
from ctelm_jax.weights.default import ENCODER_NAME

FLAGS = flags.FLAGS
flags.DEFINE_string("corpus", "data/clinical_trials.jsonl.gz", "Trial records, .jsonl or .jsonl.gz.")
flags.DEFINE_string("out", "runs/embeddings/minilm", "Output stem: writes <out>.npy, <out>.ids.json, <out>.meta.json.")
flags.DEFINE_string("encoder", "default", "Encoder folder (sentence-transformers or HF BERT), or 'default': the "
                    f"embedded {ENCODER_NAME}.")
flags.DEFINE_string("encoder_name", None, "Name recorded in the metadata; default: the folder name "
                    f"({ENCODER_NAME} for the embedded default).")
flags.DEFINE_integer("batch_size", 64, "Texts per forward pass of each process (rounded up to a multiple of its "
                     "device count).")
flags.DEFINE_integer("chunk_size", None, "Records per resumable chunk, split between the processes; default 8 "
                     "batches.")
flags.DEFINE_integer("max_length", None, "Token limit per text; default: the encoder's max_seq_length.")


def main(argv: Sequence[str]) -> None:
    """Joins the multi-process run if one is configured, loads records and encoder, runs `embed_corpus`."""
    del argv
    maybe_initialize_distributed()
    encoder = load_encoder(FLAGS.encoder, FLAGS.encoder_name, FLAGS.max_length)
    records = load_records(FLAGS.corpus)
    logging.info("embedding %d records with %s (dim %d) on %d process(es) x %d device(s)", len(records),
                 encoder.name, encoder.dim, jax.process_count(), encoder.num_shards)
    path = embed_corpus(records, encoder, FLAGS.out, render_text, FLAGS.batch_size, FLAGS.chunk_size)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    app.run(console.entry_point(main, "ctelm_jax.embed"))
