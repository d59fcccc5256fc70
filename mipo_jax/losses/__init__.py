"""Losses: pure, jittable functions of per-token arrays, never of a model."""

from mipo_jax.losses.config import loss_config, validate
from mipo_jax.losses.mipo import mipo_loss, scores
from mipo_jax.losses.needs import Requirements, check_reference_mode, required_inputs, requirements

__all__ = [
    "Requirements",
    "check_reference_mode",
    "loss_config",
    "mipo_loss",
    "required_inputs",
    "requirements",
    "scores",
    "validate",
]
