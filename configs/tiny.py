"""A tiny random decoder on the real tokenizer and corpus slice: for tests (seconds per run on CPU)."""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    """2 layers, hidden 64, GQA 4/2 heads, random 32-d embeddings, 2 short stages."""
    c = base_config()
    c.model.decoder = "random"
    c.model.tokenizer = "default"
    c.model.arch = ml_collections.ConfigDict(dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=512))
    c.model.lora_rank = 4
    c.model.domain_dim = 32
    c.model.adapter_hidden = 64
    c.data.embeddings = "random"
    c.data.max_records = 200
    c.data.seq_len = 64
    c.data.global_batch_size = 8
    c.stages = [
        dict(name="align", steps=4, trainable=("adapter",), tasks={"describe": 1.0}, learning_rate=1e-2),
        dict(name="multitask", steps=4, trainable=("adapter", "lora"),
             tasks={"describe": 0.5, "attributes": 0.25, "compare": 0.25}, learning_rate=1e-2),
    ]
    c.concepts.n_trials = 8  # edit pairs (a run with real embeddings, or its evaluation beside centroids): 48 texts
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.eval.every_steps = 4
    c.eval.batches = 1
    return c
