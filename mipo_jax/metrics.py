"""Metrics as sums plus denominators, so gradient accumulation and cross-host means are exact.

A metric is ``Metric(total, count)``; adding two metrics adds both parts, and the value is
``total / count`` only at the end. Names follow TRL (``rewards/chosen``, ``logps/rejected``...).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array


@struct.dataclass
class Metric:
    total: Array
    count: Array

    def __add__(self, other: "Metric") -> "Metric":
        return Metric(self.total + other.total, self.count + other.count)

    @property
    def value(self) -> Array:
        return self.total / jnp.maximum(self.count, 1e-30)


def weighted_mean(values: Array, weights: Array) -> Metric:
    """Mean of ``values`` under ``weights`` (same shape), kept as a sum and a denominator."""
    return Metric(jnp.sum(values * weights), jnp.sum(weights))


def merge(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> dict[str, Metric]:
    """Sum two metric dicts key by key (keys must match)."""
    if set(a) != set(b):
        raise ValueError(f"metric keys differ: {sorted(set(a) ^ set(b))}")
    return {k: a[k] + b[k] for k in a}


def values(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """Host-side float values, for logging."""
    return {k: float(jax.device_get(m.value)) for k, m in metrics.items()}
