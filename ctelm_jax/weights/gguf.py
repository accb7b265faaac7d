"""GGUF (llama.cpp) Llama checkpoints -> HF-named float32 tensors + a HF `config.json` dict, with numpy only.

Every tensor is dequantized with `gguf.quants.dequantize`, renamed to its `LlamaForCausalLM` name and reshaped to
the PyTorch layout (GGUF lists dimensions innermost first). llama.cpp's converter permutes the rows of q/k
projections per head from HF's half-split RoPE layout to an interleaved one; `unpermute_qk` undoes that.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from ctelm_jax.models.llama import LlamaConfig, RopeScaling, rope_frequencies
from ctelm_jax.weights.hf import CheckpointError, Tensors

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"
# Llama-3.x GGUFs store RoPE scaling only as per-frequency factors; these are the scalings Meta released.
LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's per-head q/k row permutation (interleaved pairs -> HF's half-split RoPE row order).

    convert_hf_to_gguf does `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`; `n_head` is the
    number of query heads for q and of key/value heads for k.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str, path: str = "GGUF") -> str:
    """The `LlamaForCausalLM` name of a llama.cpp tensor name; raises CheckpointError for unknown names."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"
    raise CheckpointError(
        f"{path}: tensor {gguf_name!r} is not part of a Llama checkpoint; expected one of "
        f"{sorted(GLOBAL_NAMES)} or blk.N.{{{','.join(BLOCK_NAMES)}}}.weight.")


def dequantize_tensor(t: ReaderTensor, path: str = "GGUF") -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch layout; raises CheckpointError for quantization types gguf cannot decode."""
    try:
        qtype = GGMLQuantizationType(t.tensor_type)
        values = dequantize(np.asarray(t.data), qtype)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has quantization type {getattr(t.tensor_type, 'name', t.tensor_type)}, which "
            f"gguf {version('gguf')} cannot dequantize ({e}); expected F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
            "Q8_0, a K-quant (Q2_K..Q6_K) or an IQ* type. Re-export the GGUF with a supported type (e.g. Q8_0) "
            "or load the model's Hugging Face checkpoint instead.") from e
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.array(values, np.float32).reshape(shape)


def _fields(reader: GGUFReader) -> dict[str, Any]:
    """All metadata key -> value (tokenizer vocab arrays skipped)."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_scaling(path: str, factors: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    """The `rope_scaling` dict whose per-frequency factors equal llama.cpp's `rope_freqs.weight`."""
    llama = LlamaConfig.from_hf_dict(cfg)
    base = np.asarray(rope_frequencies(llama))
    factor = float(factors.max())
    for low, high, orig in LLAMA3_ROPE_CANDIDATES:
        scaling = RopeScaling(factor, low, high, orig)
        scaled = np.asarray(rope_frequencies(llama.replace(rope_scaling=scaling)))
        if factors.shape == base.shape and np.allclose(base / scaled, factors, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise CheckpointError(
        f"{path}: tensor {ROPE_FREQS!r} holds RoPE factors that match no Llama-3 scaling with factor={factor} and "
        f"(low_freq_factor, high_freq_factor, original_max_position_embeddings) in {LLAMA3_ROPE_CANDIDATES}; "
        "load the model's Hugging Face checkpoint folder instead.")


def hf_config(reader: GGUFReader, path: str = "GGUF") -> dict[str, Any]:
    """The HF `LlamaForCausalLM` config.json dict described by a GGUF file's metadata."""
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: general.architecture is {arch!r}; expected 'llama' (Llama 2/3.x, SmolLM2, TinyLlama GGUFs).")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise CheckpointError(f"{path}: llama.rope.scaling.type is {scaling_type!r}; only unscaled RoPE or "
                              "Llama-3 (rope_freqs.weight) scaling is supported.")
    try:
        n_head = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_head,
            "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
            "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // n_head))),
        }
    except TypeError as e:
        raise CheckpointError(f"{path}: llama.* metadata is incomplete ({e}); expected llama.block_count, "
                              "llama.embedding_length, llama.feed_forward_length, llama.attention.head_count.") from e
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name: t for t in reader.tensors}
    if vocab is None and "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[-1])
    if vocab is None:
        raise CheckpointError(
            f"{path}: no llama.vocab_size, tokenizer vocabulary or token_embd.weight to size the vocabulary.")
    cfg.update({
        "vocab_size": int(vocab), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_theta": _f32(get("rope.freq_base", 10000.0)), "rope_scaling": None,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "float32",
    })
    for key, meta_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{meta_key}" in meta:
            cfg[key] = int(meta[f"tokenizer.ggml.{meta_key}"])
    if ROPE_FREQS in names:
        cfg["rope_scaling"] = _llama3_scaling(path, dequantize_tensor(names[ROPE_FREQS], path), cfg)
    return cfg


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], Tensors]:
    """Reads a Llama GGUF file: (HF config.json dict, {HF name: float32 array in PyTorch layout})."""
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from e
    cfg = hf_config(reader, str(path))
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    tensors: Tensors = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(t.name, str(path))
        value = dequantize_tensor(t, str(path))
        m = BLOCK_RE.fullmatch(t.name)
        if m and m.group(2) in heads:
            value = unpermute_qk(value, heads[m.group(2)])
        tensors[name] = value
    return cfg, tensors
