"""Builds the ELM and its tokenizer from the `model` section of a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctelm_jax.models.adapter import Adapter, set_standardisation
from ctelm_jax.models.elm import ELM
from ctelm_jax.models.llama import Constrain, Llama, LlamaConfig, RopeScaling, no_constraint
from ctelm_jax.weights.hf import decoder_from_hf, read_config, read_tensors
from ctelm_jax.weights.tokenizer import Tokenizer

# Fields of the config's model section that are not Llama architecture but numerics / LoRA / compile options.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "lora_rank", "lora_alpha", "lora_targets")


def decoder_dir(model_cfg: Mapping[str, Any]) -> Path:
    """The HF folder the decoder (and by default the tokenizer) comes from; 'default' is the embedded SmolLM2."""
    if model_cfg["decoder"] == "default":
        from ctelm_jax.weights.default import default_decoder_dir
        return default_decoder_dir()
    return Path(model_cfg["decoder"])


def decoder_config(model_cfg: Mapping[str, Any]) -> LlamaConfig:
    """The decoder's LlamaConfig: from config.json (or `arch` for a random decoder) plus runtime fields."""
    runtime = {k: (tuple(model_cfg[k]) if k == "lora_targets" else model_cfg[k]) for k in RUNTIME_FIELDS}
    if model_cfg.get("arch"):
        arch = dict(model_cfg["arch"])
        if arch.get("rope_scaling"):
            arch["rope_scaling"] = RopeScaling(**dict(arch["rope_scaling"]))
        return LlamaConfig(**arch, **runtime)
    return LlamaConfig.from_hf_dict(read_config(decoder_dir(model_cfg)), **runtime)


def load_tokenizer(model_cfg: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer named by `tokenizer`, else the decoder folder's."""
    return Tokenizer.from_dir(model_cfg.get("tokenizer") or decoder_dir(model_cfg))


def build_elm(model_cfg: Mapping[str, Any], tokenizer: Tokenizer, constrain: Constrain = no_constraint,
              train_embeddings: np.ndarray | None = None) -> ELM:
    """Decoder (pretrained weights unless `arch` asks for a random one) + fresh adapter, on the host: a run's step 0.
    With `train_embeddings` and `standardize_adapter_input`, the adapter's input statistics come from them."""
    cfg = decoder_config(model_cfg)
    if len(tokenizer) > cfg.vocab_size + 1:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the decoder's vocabulary is {cfg.vocab_size}; "
                         "they do not belong together (set model.tokenizer to the decoder's tokenizer).")
    rngs = nnx.Rngs(int(model_cfg["seed"]))
    decoder = Llama(cfg, rngs=rngs, constrain=constrain)
    if not model_cfg.get("arch"):
        path = decoder_dir(model_cfg)
        decoder_from_hf(decoder, read_tensors(path), source=str(path))
    adapter = Adapter(int(model_cfg["domain_dim"]), int(model_cfg["adapter_hidden"]), cfg.hidden_size, rngs=rngs,
                      param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))
    if train_embeddings is not None and model_cfg.get("standardize_adapter_input", False):
        set_standardisation(adapter, train_embeddings)
    return ELM(decoder, adapter, tokenizer.placeholder_id)


def model_signature(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a checkpoint to load into this model: architecture, adapter and LoRA shapes."""
    cfg = decoder_config(model_cfg)
    arch = cfg.to_hf_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {**{k: arch[k] for k in keep}, "domain_dim": int(model_cfg["domain_dim"]),
            "adapter_hidden": int(model_cfg["adapter_hidden"]), "lora_rank": cfg.lora_rank,
            "lora_targets": sorted(cfg.lora_targets) if cfg.lora_rank else [], "scan_layers": cfg.scan_layers}
