"""Losses: pure, jittable functions of per-token arrays, never of a model."""

from mipo_jax.losses.config import loss_config, validate
from mipo_jax.losses.mipo import mipo_loss, scores

__all__ = ["loss_config", "mipo_loss", "scores", "validate"]
