"""BERT encoder: parity with transformers (tiny random models) and sentence-transformers (all-MiniLM-L6-v2)."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from conftest import pickle_trap
from ctelm_jax.encoders.bert import SentenceEncoder, load_bert
from ctelm_jax.errors import UserError
from ctelm_jax.weights.default import default_encoder_dir
from ctelm_jax.weights.hf import CheckpointError

CORPUS = Path(__file__).resolve().parents[1] / "data" / "clinical_trials.jsonl.gz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def corpus_texts(n: int) -> list[str]:
    """Diseases, drugs and truncated criteria of the first n shipped records."""
    with gzip.open(CORPUS, "rt") as f:
        records = [json.loads(line) for _, line in zip(range(n), f)]
    return [f"{', '.join(r['diseases'])}. {', '.join(r['drugs'])}. {r['criteria'][:1500]}" for r in records]


def tiny_bert(out: Path, task: str = "model", vocab_size: int = 99) -> Path:
    """Saves a random 2-layer BERT (BertModel or BertForMaskedLM, whose names carry `bert.`) to `out`."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
    model = (transformers.BertModel if task == "model" else transformers.BertForMaskedLM)(cfg).eval()
    model.save_pretrained(out)
    return out


def tiny_sentence_dir(out: Path, pooling: str, normalize: bool) -> Path:
    """A sentence-transformers folder around a tiny random BERT with the MiniLM tokenizer."""
    tiny_bert(out, vocab_size=30522)
    for name in TOKENIZER_FILES:
        shutil.copy(default_encoder_dir() / name, out / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean"}))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40, "do_lower_case": False}))
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("task", ["model", "masked_lm"])
def test_hidden_states_match_transformers(tmp_path, task):
    path = tiny_bert(tmp_path, task)
    ref = transformers.AutoModel.from_pretrained(path).eval() if task == "model" else (
        transformers.BertForMaskedLM.from_pretrained(path).bert.eval())
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 12))
    types = rng.integers(0, 2, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    got = np.asarray(load_bert(path)(ids, mask, types))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_pooling_matches_sentence_transformers(tmp_path, pooling, normalize):
    path = tiny_sentence_dir(tmp_path / "tiny", pooling, normalize)
    texts = corpus_texts(7) + ["", "short text"]
    want = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    enc = SentenceEncoder.from_dir(path)
    assert (enc.pooling, enc.normalize, enc.max_length, enc.dim, enc.name) == (pooling, normalize, 40, 32, "tiny")
    got = enc.encode(texts, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(texts), 32)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # lengths bucket to 32/40 (max_length) and batches to 1/2/4 rows: one compile per bucket pair used, none on a rerun
    compiled = enc.compiled_shapes
    np.testing.assert_array_equal(enc.encode(texts, batch_size=4), got)
    assert enc.compiled_shapes == compiled <= 4


def test_buckets():
    enc = SentenceEncoder.__new__(SentenceEncoder)
    enc.max_length, enc.mesh = 256, None
    assert [enc.length_bucket(n) for n in (1, 32, 33, 200, 256)] == [32, 32, 64, 224, 256]
    assert [enc.batch_bucket(n, 64) for n in (1, 3, 64)] == [1, 4, 64]
    enc.mesh = type("FakeMesh", (), {"size": 8})()
    assert [enc.batch_bucket(n, 64) for n in (1, 9, 60)] == [8, 16, 64]


def test_minilm_matches_sentence_transformers():
    texts = corpus_texts(100)
    want = SentenceTransformer(str(default_encoder_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    enc = SentenceEncoder.from_dir(default_encoder_dir())
    assert (enc.dim, enc.max_length, enc.pooling, enc.normalize) == (384, 256, "mean", True)
    got = enc.encode(texts, batch_size=32)
    assert cosine(got, want).min() >= 0.99999


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "llama"}, "not BERT"),
    ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"hidden_size": 64}, "has shape"),
    ({"num_hidden_layers": 3}, "is missing"),
    ({"num_hidden_layers": 1}, "fit no parameter"),
])
def test_bad_config_is_rejected(tmp_path, changes, match):
    path = tiny_bert(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_bert(path)


def test_missing_weights_are_rejected(tmp_path):
    path = tiny_bert(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_bert(path)


def test_pickle_only_encoder_is_refused_unread(tmp_path):
    path = tiny_sentence_dir(tmp_path / "tiny", "mean", True)
    (path / "model.safetensors").unlink()
    unpickled = pickle_trap(path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickles \(pytorch_model\.bin\).*safe_serialization=True"):
        SentenceEncoder.from_dir(path)
    assert not unpickled.exists()


def test_unsupported_sentence_modules_are_rejected(tmp_path):
    path = tiny_sentence_dir(tmp_path / "tiny", "mean", True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match=r"pooling \['max'\] is not supported"):
        SentenceEncoder.from_dir(path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Transformer -> Pooling"):
        SentenceEncoder.from_dir(path)
    with pytest.raises(FileNotFoundError, match="no such encoder folder"):
        SentenceEncoder.from_dir(tmp_path / "nowhere")
