"""Times embedding the whole shipped corpus with the default encoder (all-MiniLM-L6-v2), as `ctelm_jax.embed` does.

    .venv/bin/python bench/embed_corpus.py [--batch_size=64] [--encoder=DIR] [--corpus=...]

Takes the flags of `ctelm_jax.embed` (except --out). Prints the encoder load time, then the wall time of
`embed_corpus` (rendering, tokenising, one jit compile per shape bucket, forward passes, chunk and final writes)
with texts/s and tokens/s (real tokens after truncation, padding not counted).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import jax
from absl import app

from ctelm_jax.data.corpus import load_records
from ctelm_jax.data.embeddings import embed_corpus, load_embeddings, load_encoder
from ctelm_jax.data.render import render_text
from ctelm_jax.embed import FLAGS


def main(argv: Sequence[str]) -> None:
    """Loads the corpus and encoder, embeds everything once into a temporary folder, prints the figures."""
    del argv
    records = load_records(FLAGS.corpus)
    start = time.perf_counter()
    encoder = load_encoder(FLAGS.encoder, FLAGS.encoder_name, FLAGS.max_length)
    load_s = time.perf_counter() - start
    tokens = sum(len(ids) for ids in encoder.tokenize([render_text(r) for r in records]))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = embed_corpus(records, encoder, os.path.join(tmp, "emb"), render_text, FLAGS.batch_size,
                            FLAGS.chunk_size)
        run_s = time.perf_counter() - start
        ids, array, _ = load_embeddings(path, expected_dim=encoder.dim)
    print(f"devices: {encoder.num_shards} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print(f"encoder: {encoder.name}, dim {encoder.dim}, max_length {encoder.max_length}, batch {FLAGS.batch_size}, "
          f"{encoder.compiled_shapes} compiled shapes")
    print(f"encoder load: {load_s:.1f} s")
    print(f"embedded {len(ids)} records ({tokens} tokens, {tokens / len(ids):.0f}/text) in {run_s:.1f} s: "
          f"{len(ids) / run_s:.1f} texts/s, {tokens / run_s:.0f} tokens/s; array {array.shape} {array.dtype}")


if __name__ == "__main__":
    app.run(main)
