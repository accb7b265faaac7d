"""Llama-3.1-8B-Instruct + bge-large-en-v1.5 on one node of 8 x H100 80 GB: the v5p-8 recipe with fsdp over 8 GPUs.

As in `configs/llama31_8b_v5p8.py`, training needs `--config.model.decoder=/path/to/Llama-3.1-8B-Instruct` and
`--config.data.encoder=/path/to/bge-large-en-v1.5`.

JAX preallocates 75% of GPU memory by default; the batch here assumes `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`
in the environment of every process. Sizing
(`python -m ctelm_jax.sizing --config=configs/llama31_8b_h100x8.py --num_devices=8 --memory_gib=74.5`, 74.5 GiB =
80 GB): fsdp=8 keeps 3.8 GiB of fp32 parameters per GPU; with the token loss 128 positions at a time (the v5p-8
recipe's `model.loss_chunk`) the largest per-GPU batch of the adapter + LoRA stages under 85% is 12 rows of 512 tokens
(global 96).
"""

import ml_collections

from configs import llama31_8b_v5p8


def get_config() -> ml_collections.ConfigDict:
    """The v5p-8 config on a (data 1, fsdp 8, tensor 1) mesh with 12 rows per GPU."""
    c = llama31_8b_v5p8.get_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
    c.data.global_batch_size = 96
    return c
