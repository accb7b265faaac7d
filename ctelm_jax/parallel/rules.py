"""Logical axis rules: the one place that maps parameter and activation axis names onto mesh axes."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("adapter", "tensor"),
    ("domain", None),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def as_rules(pairs: Sequence[Sequence[Any]]) -> Rules:
    """Normalises rules read from a config (lists) into hashable tuples."""
    out = []
    for name, target in pairs:
        out.append((str(name), tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(out)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis is used once per array (first claim wins), size-1 axes dropped."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every Variable of an nnx State (or pytree of Variables) from its `out_sharding` names."""

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            return x.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class Constrainer:
    """`constrain(x, logical_axes)` for models: pins activations to `mesh` by `rules` (and tells kernels that run per
    shard, like splash attention, the mesh and the spec of their operands)."""

    mesh: Mesh
    rules: Rules

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        """The PartitionSpec of logical `axes` on this mesh."""
        return logical_to_spec(axes, self.rules, self.mesh)

    def __call__(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes)))


def constrainer(mesh: Mesh, rules: Rules) -> Constrainer:
    """A `constrain(x, logical_axes)` function for models: pins activations to the mesh by the rules."""
    return Constrainer(mesh, as_rules(rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over the 'batch' rule, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
