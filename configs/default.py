"""The embedded default: SmolLM2-135M-Instruct + all-MiniLM-L6-v2 on the shipped corpus, sized for a 2-core CPU.

ctELM's full recipe (`configs/base.py`) in the CPU budget, every stage on adapter + LoRA (q, k): alignment on
`describe` plus embedding prediction (`embed`), then concept learning (`offset`) and fine control with base's
mixtures, with noise on the training input embeddings (the smoothness regulariser). The adapter-only alignment
stage of `base_config` (ELM's recipe) is too slow for a CPU budget: after 40 steps on `describe` from the same start,
validation loss was 3.73 adapter-only against 2.86 with adapter + LoRA (BENCHMARKS.md). The ablation of each part
on this budget is in BENCHMARKS.md ("Ablation of ctELM's recipe").
"""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    """About 30 minutes (400 steps of 4 x 256 tokens, ~4 s each) of training on 2 idle CPU cores."""
    c = base_config()
    c.data.seq_len = 256
    c.data.global_batch_size = 4
    c.data.embedding_noise = 0.1  # a tenth of the spread: well inside the typical gap to a trial's nearest neighbour
    c.stages[0].update(steps=200, trainable=("adapter", "lora"), learning_rate=1e-3)
    c.stages[1].update(steps=100, learning_rate=5e-4)
    c.stages[2].update(steps=100, learning_rate=5e-4)
    c.checkpoint.every_steps = 50
    c.eval.every_steps = 100
    c.eval.batches = 4
    return c
