"""The device mesh (data, fsdp, tensor) from config sizes, with -1 filling the remaining devices."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ctelm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes in MESH_AXES order; one -1 takes what is left; the product must equal the device count (else UserError)."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, shape):
        if size < 1 and size != -1:
            raise UserError(f"mesh.{axis}={size}: an axis size is a number of devices (or -1: the devices left); set "
                            f"--config.mesh.{axis} to a positive size or -1.")
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise UserError(f"mesh {dict(sizes)}: at most one axis may be -1.")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {dict(sizes)}: {num_devices} devices are not divisible by the fixed axes ({fixed}).")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {num_devices} are present; "
            "set the sizes so their product is the device count, or use -1 on one axis.")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (so logical-axis shardings and XLA propagation work together)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
