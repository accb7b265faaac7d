"""Storage dtypes per parameter group: groups that no stage of the curriculum trains (the frozen base) are held in
`model.frozen_dtype` (e.g. bfloat16: half the memory and all-gather traffic); every group some stage trains keeps its
`model.param_dtype` master (float32) in every stage.

The choice is made once per run, from the whole curriculum, not per stage: casting a frozen leaf to bf16 when a stage
starts and back to f32 when a later stage trains it would train that stage from bf16-rounded weights (the rounding
cannot be undone). So in a LoRA stage followed by a full fine-tuning stage, the decoder stays float32 in both.
Compute is unchanged: every layer casts its weights to `model.dtype` before its matmul.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from ctelm_jax.errors import UserError
from ctelm_jax.train.optimizer import GROUPS, Params, group_of

FROZEN_DTYPES = ("float32", "bfloat16")


def frozen_dtype(model_cfg: Mapping[str, Any]) -> jnp.dtype:
    """`model.frozen_dtype` (float32 when a config predates it); UserError for a dtype that is not offered."""
    name = str(model_cfg.get("frozen_dtype", "float32"))
    if name not in FROZEN_DTYPES:
        raise UserError(f"model.frozen_dtype={name!r}; choose one of {FROZEN_DTYPES} "
                        "(set --config.model.frozen_dtype=bfloat16 to hold the frozen base in bf16).")
    return jnp.dtype(name)


def frozen_groups(stages: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The parameter groups (adapter / lora / decoder) that no stage trains."""
    trained = {g for s in stages for g in s["trainable"]}
    return frozenset(GROUPS) - trained


def cast_frozen(params: Params, model_cfg: Mapping[str, Any], stages: Iterable[Mapping[str, Any]]) -> Params:
    """`params` (arrays or ShapeDtypeStructs, nested dict) with every leaf of a never-trained group in the config's
    frozen dtype; shardings are kept, other leaves are returned as they are."""
    dtype, frozen = frozen_dtype(model_cfg), frozen_groups(stages)

    def cast(path: tuple[Any, ...], x: Any) -> Any:
        if group_of(tuple(str(p) for p in path)) not in frozen or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: cast(k, v) for k, v in flat.items()})
