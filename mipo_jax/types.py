"""Batch types shared by losses, priors and the trainer.

Shape legend (jaxtyping dimension names used across the package):
  B pairs, T tokens, V vocabulary, D model width, F feed-forward width,
  H heads, K head dim, L layers, N unpaired examples / samples.

The pair axis has size 2: index 0 is the chosen response y_w, index 1 the rejected y_l.
"""

import dataclasses

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

CHOSEN, REJECTED = 0, 1


@struct.dataclass
class TokenInputs:
    """Everything a preference loss may read, per token on the pair axis ``[B, 2, T]``.

    Only ``policy`` and ``mask`` are required; the other fields are filled by the trainer
    (from a live model or a cache) when a configured part of the loss declares it needs them
    (``Registry.register(..., needs=...)``, words of :data:`NEEDS`). A part that reads a
    missing field raises a ``ValueError`` at trace time naming it.

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
      prior: per-token log ζ_φ of a learnable prior model (prompt-free, mathematics §1.5).
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


@dataclasses.dataclass(frozen=True)
class Need:
    """What one word of a ``needs=`` declaration asks of whoever fills ``TokenInputs``.

    Attributes:
      field: the ``TokenInputs`` field it fills.
      what: a few words for error messages.
      reference: the reference modes that can serve it (``live``: the reference model run
        in the step; ``cached``: per-token log-probs stored once; ``dataset``: summed
        log-probs from dataset columns); empty when it reads no reference.
      full_vocab: computed from whole next-token distributions, not one log-prob per token.
      module: the trainable module besides the policy that computes it ("" when none).
    """

    field: str
    what: str
    reference: tuple[str, ...] = ()
    full_vocab: bool = False
    module: str = ""


# The vocabulary of ``needs=``: the optional TokenInputs fields, with the reference in two
# words (summed log-probs suffice, or per-token ones). ``mask_d`` and ``prior_samples_weight``
# are read when present but never needed: the mask net gives m^d with m^u when its masks are
# independent, and sample weights default to ones.
NEEDS: dict[str, Need] = {
    "reference": Need("reference", "reference log-probs", ("live", "cached", "dataset")),
    "reference_tokens": Need("reference", "per-token reference log-probs", ("live", "cached")),
    "kl": Need(
        "kl", "the per-token KL to the reference's full distribution", ("live",), full_vocab=True
    ),
    "logsumsq": Need("logsumsq", "the policy's per-token log Σ_v π²", full_vocab=True),
    "token_weights": Need("token_weights", "per-token importance weights"),
    "mask_u": Need(
        "mask_u", "masks computed from the reference's hidden states", ("live",), module="mask_net"
    ),
    "prior": Need("prior", "a learnable prior's log-probs", module="prior"),
    "prior_samples": Need("prior_samples", "the prior's log-probs of samples", module="prior"),
    "prior_samples_mask": Need("prior_samples_mask", "the policy samples' masks", module="prior"),
}


def compute_dtype(x: Array):
    """float32, or float64 when the input already is float64 (x64 tests)."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
