"""Corpus embedding: data-parallel encode, resumable job (in one process or several), and validation of stored
embedding sets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ctelm_jax.data.corpus import load_records, write_records
from ctelm_jax.data.embeddings import embed_corpus, embedding_paths, load_embeddings, load_encoder, save_embeddings
from ctelm_jax.data.render import render_text
from ctelm_jax.encoders.bert import SentenceEncoder
from ctelm_jax.weights.default import default_encoder_dir
from conftest import free_port, wait_all

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def short_text(record: dict) -> str:
    """A short rendering, so the test runs at max_length 32."""
    return f"{', '.join(record['diseases'])}. {', '.join(record['drugs'])}. {record['criteria'][:200]}"


@pytest.fixture(scope="module")
def records():
    return load_records()[:20]


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2 at 32 tokens, batches split over the 8 fake CPU devices of conftest (as the CLI loads it)."""
    return load_encoder(max_length=32)


class Interrupting:
    """Wraps an encoder; `encode` raises on call number `fail_at` (1-based) and counts its calls."""

    def __init__(self, inner: SentenceEncoder, fail_at: int | None = None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, batch_size=64, progress=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.encode(texts, batch_size, progress)


def test_sharded_encode_matches_single_device(encoder):
    assert encoder.num_shards == jax.device_count() == 8
    texts = [short_text(r) for r in load_records()[:5]]
    single = SentenceEncoder.from_dir(default_encoder_dir(), max_length=32)
    got = encoder.encode(texts, batch_size=4)
    np.testing.assert_allclose(got, single.encode(texts, batch_size=4), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, records, encoder):
    whole = embed_corpus(records, encoder, tmp_path / "whole", short_text, batch_size=4, chunk_size=8,
                         show_progress=False)
    killed = Interrupting(encoder, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(records, killed, tmp_path / "resumed", short_text, batch_size=4, chunk_size=8,
                     show_progress=False)
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in partial.glob("chunk_*.npy")) == ["chunk_000000.npy"]
    assert not any(p.exists() for p in embedding_paths(tmp_path / "resumed"))
    with pytest.raises(ValueError, match=r"different \['chunk_size'\]"):
        embed_corpus(records, encoder, tmp_path / "resumed", short_text, batch_size=4, chunk_size=4,
                     show_progress=False)
    resumer = Interrupting(encoder)
    resumed = embed_corpus(records, resumer, tmp_path / "resumed", short_text, batch_size=4, chunk_size=8,
                           show_progress=False)
    assert resumer.calls == 2  # chunks 1 and 2 of [0:8], [8:16], [16:20]
    assert not partial.exists()
    ids_a, emb_a, meta_a = load_embeddings(whole, expected_dim=384)
    ids_b, emb_b, meta_b = load_embeddings(resumed, expected_dim=384)
    assert ids_a == ids_b == [r["nctid"] for r in records]
    np.testing.assert_array_equal(emb_a, emb_b)
    assert meta_a == meta_b
    assert (meta_a["dim"], meta_a["count"], meta_a["normalized"], meta_a["pooling"]) == (384, 20, True, "mean")
    direct = encoder.encode([short_text(r) for r in records], batch_size=4)
    np.testing.assert_allclose(emb_a, direct, atol=1e-5)


def _write_set(out, n=6, dim=8):
    ids = [f"NCT{i:08d}" for i in range(n)]
    array = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    save_embeddings(out, ids, array, {"encoder": "test"})
    return ids, array


def test_load_embeddings_round_trip_and_rejects_bad_sets(tmp_path):
    out = tmp_path / "set"
    ids, array = _write_set(out)
    got_ids, got, meta = load_embeddings(str(out) + ".npy")
    assert got_ids == ids and meta == {"encoder": "test", "dim": 8, "count": 6}
    np.testing.assert_array_equal(got, array)

    with pytest.raises(ValueError, match="dim 8 but 384 is expected"):
        load_embeddings(out, expected_dim=384)

    bad = array.copy()
    bad[3, 1] = np.nan
    np.save(str(out) + ".npy", bad)
    with pytest.raises(ValueError, match=r"contain NaN or inf \(rows \[3\], ids \['NCT00000003'\]\).*ctelm_jax.embed"):
        load_embeddings(out)
    with pytest.raises(ValueError, match="NaN"):
        save_embeddings(out, ids, bad, {})

    _write_set(out)
    (tmp_path / "set.ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(ValueError, match="5 records but 6 embedding rows"):
        load_embeddings(out)

    _write_set(out)
    np.save(str(out) + ".npy", array[:, :4].copy())
    (tmp_path / "set.ids.json").write_text(json.dumps(ids))
    with pytest.raises(ValueError, match="says dim=8"):
        load_embeddings(out)

    (tmp_path / "set.meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="set.meta.json: missing"):
        load_embeddings(out)


def embed_in_two_processes(corpus: Path, out: Path, logdir: Path) -> tuple[list[int] | None, list[str]]:
    """Runs `python -m ctelm_jax.embed` as 2 processes of 2 fake CPU devices each; their exit codes (None: killed
    after TIMEOUT_S) and logs."""
    port = free_port()
    logs = [logdir / f"{out.name}.process{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   CTELM_INIT_TIMEOUT_S="120")
        cmd = [sys.executable, "-m", "ctelm_jax.embed", f"--corpus={corpus}", f"--out={out}", "--max_length=32",
               "--batch_size=4", "--chunk_size=8", "--verbosity=1"]  # INFO on the console: who embeds, what resumes
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT))
    codes = wait_all(procs, TIMEOUT_S)
    return codes, [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def slice_29(tmp_path_factory):
    """29 records (chunks of 8, 8, 8, 5: two-process shares of 4+4 and 2+3 rows) and their .jsonl file."""
    records = load_records()[:29]
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_records(records, corpus)
    return records, corpus


# Both runs compute each row with the same operations on the same padded length (32 tokens, the cap); only the rows
# per device differ (1 of a batch of 4 padded to 8 on one process of 8 devices; 1 or 2 on two processes of 2), which
# may change how XLA tiles the matmuls and hence the order of float32 additions. A reordered sum of K terms moves by
# ~sqrt(K) * 2^-24 relative (K <= 1536: ~2.4e-6), and every LayerNorm rescales, so errors do not compound over the 6
# layers; the rows are unit vectors, so atol 1e-5 is a few such reorderings. Measured: 1.5e-7 (2 rows bit-equal).
TWO_PROCESS_ATOL = 1e-5


def test_two_processes_embed_like_one_and_resume_its_chunks(tmp_path, slice_29, encoder):
    records, corpus = slice_29
    single = embed_corpus(records, encoder, tmp_path / "one", render_text, batch_size=4, chunk_size=8,
                          show_progress=False)
    ids, want, meta = load_embeddings(single)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(records, Interrupting(encoder, fail_at=2), tmp_path / "two", render_text, batch_size=4,
                     chunk_size=8, show_progress=False)
    kept = want[7::-1].copy()  # chunk 0 replaced by its rows reversed: a resumed run must keep, not recompute, it
    np.save(tmp_path / "two.partial" / "chunk_000000.npy", kept)

    codes, logs = embed_in_two_processes(corpus, tmp_path / "two", tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    assert "on 2 process(es) x 2 device(s)" in logs[1]
    assert "resuming, 1 of 4 chunks already done" in logs[0]
    got_ids, got, got_meta = load_embeddings(tmp_path / "two")
    assert got_ids == ids and got_meta == meta
    assert not (tmp_path / "two.partial").exists()
    np.testing.assert_array_equal(got[:8], kept)
    np.testing.assert_allclose(got[8:], want[8:], rtol=0, atol=TWO_PROCESS_ATOL)


def test_two_processes_stop_together_when_process_0_cannot_resume(tmp_path, slice_29, encoder):
    records, corpus = slice_29
    with pytest.raises(KeyboardInterrupt):  # a partial run with chunks of 4; the processes ask for 8
        embed_corpus(records, Interrupting(encoder, fail_at=2), tmp_path / "other", render_text, batch_size=4,
                     chunk_size=4, show_progress=False)
    codes, logs = embed_in_two_processes(corpus, tmp_path / "other", tmp_path)
    assert codes is not None and 0 not in codes, "\n".join(logs)
    assert "different ['chunk_size']" in logs[0]
    assert "process 0 failed to open" in logs[1]
