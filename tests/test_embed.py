"""Corpus embedding: data-parallel encode, resumable job, and validation of stored embedding sets."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ctelm_jax.data.corpus import load_records
from ctelm_jax.data.embeddings import embed_corpus, embedding_paths, load_embeddings, save_embeddings
from ctelm_jax.encoders.bert import SentenceEncoder
from ctelm_jax.weights.default import default_encoder_dir


def short_text(record: dict) -> str:
    """A short rendering, so the test runs at max_length 32."""
    return f"{', '.join(record['diseases'])}. {', '.join(record['drugs'])}. {record['criteria'][:200]}"


@pytest.fixture(scope="module")
def records():
    return load_records()[:20]


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2 at 32 tokens, batches split over the 8 fake CPU devices of conftest."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    return SentenceEncoder.from_dir(default_encoder_dir(), max_length=32, mesh=mesh)


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
    with pytest.raises(ValueError, match="5 ids but 6 embedding rows"):
        load_embeddings(out)

    _write_set(out)
    np.save(str(out) + ".npy", array[:, :4].copy())
    (tmp_path / "set.ids.json").write_text(json.dumps(ids))
    with pytest.raises(ValueError, match="says dim=8"):
        load_embeddings(out)

    (tmp_path / "set.meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="set.meta.json: missing"):
        load_embeddings(out)
