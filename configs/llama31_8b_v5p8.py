"""Llama-3.1-8B-Instruct + bge-large-en-v1.5 (1024-d) at ctELM's scale on a TPU v5p-8 (4 chips, 95 GiB HBM each).

Before training, point `model.decoder` at a Hugging Face Llama-3.1-8B(-Instruct) folder (config.json, safetensors,
tokenizer) and `data.encoder` at a bge-large-en-v1.5 folder, and delete the `model.arch` line below (a flag cannot
clear it): while `arch` is set, `models.build.build_elm` builds a randomly initialised decoder of that shape and reads
no weights, and the tokenizer is still read from `model.decoder`. The sizing tool and tests use `arch`; there is no
checkpoint in this repository.

Sizing (`python -m ctelm_jax.sizing --config=configs/llama31_8b_v5p8.py --num_devices=4 --memory_gib=95`): with
fp32 parameters (Adam on the adapter and LoRA factors stays exact), bf16 compute, scanned layers and no remat,
fsdp=4 keeps 7.5 GiB of parameters per chip and the largest per-chip batch of the multitask stage (the larger one)
under 85% of 95 GiB is 13 rows of 512 tokens (global 52). Rendered trials are ~130 tokens; rows pack several tasks.
"""

import ml_collections

from configs.base import base_config

LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=(128001, 128008, 128009))


def get_config() -> ml_collections.ConfigDict:
    """Adapter alignment, then adapter + LoRA (r 16 on q/k/v/o) multitask, bf16 compute, fsdp over the 4 chips."""
    c = base_config()
    c.model.decoder = "/path/to/Llama-3.1-8B-Instruct"  # fill in: a Hugging Face folder with the weights
    c.model.arch = ml_collections.ConfigDict(LLAMA31_8B)  # delete once `decoder` points at the real weights
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "none"
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.model.domain_dim = 1024
    c.model.adapter_hidden = 4096
    c.data.encoder = "/path/to/bge-large-en-v1.5"  # fill in: the sentence-transformers folder (1024-d)
    c.data.seq_len = 512
    c.data.global_batch_size = 52
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=1))
    c.stages = [
        dict(name="align", steps=1000, trainable=("adapter",), tasks={"describe": 1.0}, learning_rate=1e-3,
             warmup_steps=50),
        dict(name="multitask", steps=3000, trainable=("adapter", "lora"),
             tasks={"describe": 0.4, "attributes": 0.25, "compare": 0.15, "concept": 0.1, "reconstruct": 0.1},
             learning_rate=2e-4, warmup_steps=100),
    ]
    c.checkpoint.every_steps = 250
    c.eval.every_steps = 250
    c.eval.batches = 8
    return c
