"""weights.hf: safetensors folders <-> HF-named tensors <-> `Llama`, and the errors bad checkpoints raise."""

import json

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from conftest import pickle_trap
from ctelm_jax.errors import UserError
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.run.build import check_model_sources
from ctelm_jax.weights.hf import (
    INDEX_FILE, CheckpointError, SafetensorsFolder, decoder_from_hf, decoder_to_hf, load_decoder, read_config,
    read_tensors, write_tensors,
)

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def random_tensors(cfg: LlamaConfig = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """HF tensors of a randomly initialised decoder."""
    return decoder_to_hf(Llama(cfg, rngs=nnx.Rngs(seed)))


def save_checkpoint(path, cfg: LlamaConfig = TINY, **kw) -> dict[str, np.ndarray]:
    """Writes a random checkpoint folder; returns its tensors."""
    tensors = random_tensors(cfg)
    write_tensors(tensors, path, **kw)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return tensors


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(scan_layers=True), TINY.replace(tie_word_embeddings=True)])
def test_decoder_to_hf_round_trip_is_bit_identical(cfg):
    tensors = random_tensors(cfg, seed=1)
    model = Llama(cfg, rngs=nnx.Rngs(2))
    decoder_from_hf(model, tensors)
    back = decoder_to_hf(model)
    assert ("lm_head.weight" in back) != cfg.tie_word_embeddings
    assert back.keys() == tensors.keys() and len(back) == 2 + 9 * cfg.num_layers + (not cfg.tie_word_embeddings)
    assert back["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 32)  # PyTorch (out, in)
    for name in tensors:
        assert back[name].dtype == tensors[name].dtype and np.array_equal(back[name], tensors[name]), name


def test_sharded_folder_round_trip(tmp_path):
    tensors = save_checkpoint(tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / INDEX_FILE).is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = decoder_to_hf(load_decoder(tmp_path))
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)


def test_other_architecture_is_rejected(tmp_path):
    save_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="model_type='bert'.*expected model_type 'llama'"):
        load_decoder(tmp_path)


def test_shape_mismatch_names_the_tensor():
    tensors = random_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(40, 32\)"):
        decoder_from_hf(Llama(TINY, rngs=nnx.Rngs(0)), tensors)


def test_missing_tensor_names_the_tensor():
    tensors = random_tensors()
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is missing"):
        decoder_from_hf(Llama(TINY, rngs=nnx.Rngs(0)), tensors)


def test_missing_shard_raises(tmp_path):
    save_checkpoint(tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        read_tensors(tmp_path)


def test_missing_config_and_weights_raise(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        read_tensors(tmp_path)


def test_pickle_only_decoder_folder_is_refused_unread(tmp_path):
    save_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    unpickled = pickle_trap(tmp_path / "pytorch_model.bin")
    model = tiny.get_config().model
    model.decoder = model.tokenizer = str(tmp_path)
    how = r"only as PyTorch pickles \(pytorch_model\.bin\).*save_pretrained\(folder, safe_serialization=True\)"
    with pytest.raises(UserError, match=how):
        check_model_sources(model)  # before any work
    for read in (read_tensors, SafetensorsFolder, load_decoder):
        with pytest.raises(UserError, match=how):
            read(tmp_path)
    assert not unpickled.exists()
