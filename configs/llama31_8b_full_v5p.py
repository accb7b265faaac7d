"""Full fine-tuning of Llama-3.1-8B-Instruct + bge-large-en-v1.5 on a TPU v5p-8: adapter alignment, then the adapter
and every decoder weight trained together (no LoRA), fsdp over all chips.

Training needs the two folders, given as flags (there is no checkpoint in this repository):

    python -m ctelm_jax.train --config=configs/llama31_8b_full_v5p.py --workdir=gs://BUCKET/run \
        --config.model.decoder=/path/to/Llama-3.1-8B-Instruct --config.data.encoder=/path/to/bge-large-en-v1.5

Memory (the TPU compiler: `python -m ctelm_jax.aot --config=configs/llama31_8b_full_v5p.py --topology=v5p:2x2x1
--find_batch`): fp32 parameters, gradients and AdamW moments of the 8B decoder are 120 GiB, 30 GiB per chip over the 4
chips of a v5p-8, the smallest v5p slice. With `dots_no_batch` remat (layer matmul outputs kept, the attention products
and elementwise work recomputed) each fine-tuning stage (concepts, control) at 24 rows of 512 tokens per chip (global
96) peaks at 78.4 GiB per chip, 83% of 95 GiB, with xla attention (83.5 GiB while the loss kept a log-softmax copy;
BENCHMARKS.md "TPU compiler (ahead of time)"). The splash attention kernel (`model.attention` auto, from the LoRA
recipe) peaked the same as xla here (issue 14). The token loss takes every position at once (`model.loss_chunk` 0):
under this remat the layers' backward, not the logits, sets the peak, and chunks of 128 measured 78.9 GiB.
"""

import ml_collections

from configs import llama31_8b_v5p8
from configs.base import ALIGN_TASKS, CONCEPT_TASKS, CONTROL_TASKS


def get_config() -> ml_collections.ConfigDict:
    """The LoRA recipe's model and data without LoRA; stages 2 and 3 train adapter + decoder; fsdp over every chip."""
    c = llama31_8b_v5p8.get_config()
    c.model.lora_rank = 0
    c.model.remat_policy = "dots_no_batch"
    c.model.loss_chunk = 0  # measured: no lower peak with chunks here (module docstring)
    c.data.global_batch_size = 96
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.stages = [
        dict(name="align", steps=1000, trainable=("adapter",), tasks=dict(ALIGN_TASKS), learning_rate=1e-3,
             warmup_steps=50),
        dict(name="concepts", steps=1500, trainable=("adapter", "decoder"), tasks=dict(CONCEPT_TASKS),
             learning_rate=2e-5, warmup_steps=100, weight_decay=0.01),
        dict(name="control", steps=1500, trainable=("adapter", "decoder"), tasks=dict(CONTROL_TASKS),
             learning_rate=2e-5, warmup_steps=100, weight_decay=0.01),
    ]
    return c
