"""Priors ζ: registered by name, chosen by ``config.loss.prior.name``.

Importing this package registers every prior in :data:`PRIORS`.
"""

from mipo_jax.priors import policy, reference  # noqa: F401  (registration side effects)
from mipo_jax.priors.base import PRIORS, lengths, seq_sum

__all__ = ["PRIORS", "lengths", "seq_sum"]
