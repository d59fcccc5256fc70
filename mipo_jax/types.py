"""Batch types shared by losses, priors and the trainer.

Shape legend (jaxtyping dimension names used across the package):
  B pairs, T tokens, V vocabulary, D model width, F feed-forward width,
  H heads, K head dim, L layers, N unpaired examples / samples.

The pair axis has size 2: index 0 is the chosen response y_w, index 1 the rejected y_l.
"""

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

CHOSEN, REJECTED = 0, 1


@struct.dataclass
class TokenInputs:
    """Everything a preference loss may read, per token on the pair axis ``[B, 2, T]``.

    Only ``policy`` and ``mask`` are required; the other fields are filled by the trainer
    (from a live model or a cache) when the configured prior, link or term needs them.
    A prior that needs a missing field raises a ``ValueError`` at trace time naming it.

    Attributes:
      policy: log π_θ(y_t | x, y_<t) per token.
      mask: 1.0 on completion tokens, 0.0 on prompt and padding.
      reference: log π_ref(y_t | ...) per token, or already summed per sequence ``[B, 2]``
        (e.g. the TRL columns ``ref_chosen_logps``/``ref_rejected_logps``). For DICE and SPIN
        the "reference" is the previous iterate π_{t-1}.
      kl: per-token forward KL(π_ref ‖ π_θ) over the full vocabulary (TDPO, SparsePO).
      token_weights: per-token importance weights (TIS-DPO), treated as constants.
      mask_u: SparsePO reward mask m^u ≥ 0 (differentiable w.r.t. the mask network).
      mask_d: SparsePO KL mask m^d ≥ 0; ``None`` means "sparse-common" (m^d = m^u).
      logsumsq: per-token log Σ_v π_θ(v)² (WPO weighting).
      prior: per-token log ζ_φ of a learnable prior model (prompt-free, spec §1.5).
      prior_samples: ``[N, T]`` log ζ_φ of responses sampled from the policy (MI term).
      prior_samples_mask: ``[N, T]`` completion mask of ``prior_samples``.
      prior_samples_weight: ``[N]`` sample weights (1 for Monte-Carlo samples, π(y) for an
        exact enumeration); ``None`` means all ones.
      pair_valid: ``[B]`` 1.0 for real pairs, 0.0 for padding pairs of a fixed-shape batch.
    """

    policy: Float[Array, "B 2 T"]
    mask: Float[Array, "B 2 T"]
    reference: Array | None = None
    kl: Float[Array, "B 2 T"] | None = None
    token_weights: Float[Array, "B 2 T"] | None = None
    mask_u: Float[Array, "B 2 T"] | None = None
    mask_d: Float[Array, "B 2 T"] | None = None
    logsumsq: Float[Array, "B 2 T"] | None = None
    prior: Float[Array, "B 2 T"] | None = None
    prior_samples: Float[Array, "N T"] | None = None
    prior_samples_mask: Float[Array, "N T"] | None = None
    prior_samples_weight: Float[Array, " N"] | None = None
    pair_valid: Float[Array, " B"] | None = None

    def require(self, *names: str, who: str) -> None:
        """Raise a clear error at trace time when a needed field is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"{who} needs TokenInputs field(s) {missing}, which the batch does not provide."
            )

    def astype(self, dtype) -> "TokenInputs":
        """All floating fields cast to ``dtype`` (losses compute in float32 or wider)."""
        cast = lambda x: None if x is None else jnp.asarray(x).astype(dtype)
        return TokenInputs(**{k: cast(v) for k, v in vars(self).items()})


def compute_dtype(x: Array):
    """float32, or float64 when the input already is float64 (x64 tests)."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
