"""Device mesh ('data', 'fsdp', 'tensor') from configured sizes, -1 filling the rest."""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def fill_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 in `sizes` so that their product is `num_devices`."""
    sizes = tuple(int(s) for s in sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide {num_devices} devices")
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh sizes {sizes} need {math.prod(sizes)} devices, have {num_devices}")
    return sizes


def make_mesh(
    sizes: Sequence[int] = (-1, 1, 1), *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes `AXES` and Auto axis types (GSPMD propagation, logical-rules style).

    Args:
      sizes: (data, fsdp, tensor); one entry may be -1 to take the remaining devices.
      devices: defaults to all devices. `jax.make_mesh` orders them for the physical
        topology (ICI rings on TPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = fill_sizes(sizes, len(devices))
    auto = (AxisType.Auto,) * len(AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=auto)
