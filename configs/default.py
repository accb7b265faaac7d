"""The embedded default: SmolLM2-135M-Instruct + all-MiniLM-L6-v2 on the shipped corpus, sized for a 2-core CPU.

Stage 1 aligns the adapter alone on `describe` (decoder frozen); stage 2 trains adapter + LoRA (q, k) on all tasks.
"""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    """About 25 minutes (200 steps) of training on 2 CPU cores (see BENCHMARKS.md)."""
    c = base_config()
    c.data.seq_len = 256
    c.data.global_batch_size = 4
    c.stages[0]["steps"] = 100
    c.stages[1]["steps"] = 100
    c.checkpoint.every_steps = 25
    c.eval.every_steps = 50
    c.eval.batches = 2
    return c
