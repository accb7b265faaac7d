"""Which parameters a stage trains, and the optimizer: AdamW on those, `set_to_zero` (no state) on the rest."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import optax
from flax import traverse_util

Params = dict[str, Any]
GROUPS = ("adapter", "lora", "decoder")
FIXED = "fixed"  # the adapter's input statistics (`models.adapter.InputStats`): set once, never trained
_FIXED_LEAVES = ("input_mean", "input_scale")


def group_of(path: tuple[Any, ...]) -> str:
    """The group a parameter path belongs to: adapter (with the embedding-prediction head: the ELM's own new
    parameters), lora (LoRA factors), decoder (base weights) or fixed."""
    if path[0] == "embed_head":
        return "adapter"
    if path[0] == "adapter":
        return FIXED if path[-1] in _FIXED_LEAVES else "adapter"
    return "lora" if "lora" in path else "decoder"


def param_labels(params: Params, trainable: Sequence[str]) -> Params:
    """A tree like `params` with 'train' on the stage's trainable groups and 'frozen' elsewhere."""
    unknown = set(trainable) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainable groups {sorted(unknown)}; choose from {GROUPS}.")
    flat = traverse_util.flatten_dict(params)
    labels = {k: "train" if group_of(k) in trainable else "frozen" for k in flat}
    if "train" not in labels.values():
        raise ValueError(f"trainable={list(trainable)} selects no parameter (is lora_rank 0 while training 'lora'?).")
    return traverse_util.unflatten_dict(labels)


def partition(params: Params, labels: Params) -> tuple[dict, dict]:
    """Flat {path: array} dicts of the trainable and the frozen parameters."""
    flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
    train = {k: v for k, v in flat.items() if flat_labels[k] == "train"}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] != "train"}
    return train, frozen


def combine(*flat_parts: dict) -> Params:
    """Nested params from flat partitions."""
    merged: dict = {}
    for part in flat_parts:
        merged.update(part)
    return traverse_util.unflatten_dict(merged)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.1) -> optax.Schedule:
    """Linear warm-up to `peak`, then cosine decay to `end_fraction * peak` at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else peak, peak, warmup_steps, max(total_steps, warmup_steps + 1), peak * end_fraction)


def make_optimizer(
    labels: Params, schedule: optax.Schedule, weight_decay: float = 0.0, clip_norm: float = 1.0,
    b1: float = 0.9, b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW (with global-norm clipping) on 'train' leaves; `set_to_zero` on 'frozen' ones, which keeps no state."""
    train = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))
