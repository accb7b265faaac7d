"""Llama-3.1-8B-Instruct + bge-large-en-v1.5 (1024-d) at ctELM's scale on a TPU v5p-8 (4 chips, 95 GiB HBM each).

Training needs the two folders, given as flags (there is no checkpoint in this repository):

    python -m ctelm_jax.train --config=configs/llama31_8b_v5p8.py --workdir=gs://BUCKET/run \
        --config.model.decoder=/path/to/Llama-3.1-8B-Instruct --config.data.encoder=/path/to/bge-large-en-v1.5

A missing flag or folder stops the run before any work with one line naming the flag. `model.arch` declares the
decoder's shape: the sizing and AOT tools read it without weights, and training checks the folder's config.json
against it.

Memory (the TPU compiler: `python -m ctelm_jax.aot --config=configs/llama31_8b_v5p8.py --topology=v5p:2x2x1`): with fp32
parameters (Adam on the adapter and LoRA factors stays exact), bf16 compute, scanned layers and no remat, fsdp=4 keeps
7.5 GiB of parameters per chip. With the splash attention kernel (`model.attention` auto on TPU) and the token loss over
every position at once, the adapter + LoRA stages (concepts, control: same shapes, the larger ones) at 12 rows of 512
tokens per chip (global 48) peaked at 65.1 GiB per chip (68% of 95 GiB) and 16 rows (global 64, 86%) fit; with
`--config.model.attention=xla`, 81.6 GiB at 48 (BENCHMARKS.md, issue 14). The token loss now runs 128 positions at a
time (`model.loss_chunk`: never the whole (rows, 512, 128256) f32 logits): with xla attention 14 rows (global 56) peak
at 81.5 GiB, 86% (at 12 rows: 71.9 GiB; 75.7 with all positions at once); with splash and chunks, global 64 peaks at
68.5 GiB (72%) and 72 at 75.3 GiB (79%). The config has 56, the sizing tool's largest: the tool (`python -m
ctelm_jax.sizing ... --num_devices=4 --memory_gib=95`), which says 77.5 GiB at 56, counts the dense attention's
probabilities. Rendered trials are ~130 tokens; rows pack several tasks.
"""

import ml_collections

from configs.base import ALIGN_TASKS, CONCEPT_TASKS, CONTROL_TASKS, base_config

LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=(128001, 128008, 128009))


def get_config() -> ml_collections.ConfigDict:
    """Adapter alignment, then adapter + LoRA (r 16 on q/k/v/o) concept and control stages, bf16 compute, fsdp over
    the 4 chips."""
    c = base_config()
    c.model.decoder = ""  # required: --config.model.decoder=/path/to/Llama-3.1-8B-Instruct (HF folder)
    c.model.arch = ml_collections.ConfigDict(LLAMA31_8B)  # the declared shape, checked against that folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "none"
    c.model.attention = "auto"  # on TPU the splash kernel: no (rows, heads, 512, 512) scores held (models/attention.py)
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.model.domain_dim = 1024
    c.model.adapter_hidden = 4096
    c.model.loss_chunk = 128
    c.data.encoder = ""  # required: --config.data.encoder=/path/to/bge-large-en-v1.5 (sentence-transformers, 1024-d)
    c.data.seq_len = 512
    c.data.global_batch_size = 56
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=1))
    c.stages = [
        dict(name="align", steps=1000, trainable=("adapter",), tasks=dict(ALIGN_TASKS), learning_rate=1e-3,
             warmup_steps=50),
        dict(name="concepts", steps=1500, trainable=("adapter", "lora"), tasks=dict(CONCEPT_TASKS),
             learning_rate=2e-4, warmup_steps=100),
        dict(name="control", steps=1500, trainable=("adapter", "lora"), tasks=dict(CONTROL_TASKS),
             learning_rate=2e-4, warmup_steps=100),
    ]
    c.checkpoint.every_steps = 250
    c.eval.every_steps = 250
    c.eval.batches = 8
    return c
