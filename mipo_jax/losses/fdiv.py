"""f-divergence scores g(ρ) (Wang et al. 2023, f-DPO; TRL 1.16 ``f_divergence_type``).

The implicit log-ratio ρ = log π − log ζ is replaced by a score g(ρ) before the links that
read a pair through its score difference (``links.DIFFERENCE_LINKS``). Only ``reverse_kl``
(g = ρ) is MI-DPO proper; the others generalise the score. Every g is TRL 1.16's, f'(u) at
u = e^ρ normalised so that g(0) = f'(1) = 0: the constants cancel in a difference of equally
normalised scores, but not once a score is divided by a length (``normalize='mean'`` under
``trl_order``), so they are part of the definition.
"""

import jax
import jax.numpy as jnp

from mipo_jax.registry import Registry

FDIVS = Registry("f_divergence")
IDENTITY = "reverse_kl"  # the score that leaves ρ as it is
ALPHA_EXPONENT_MAX = 80.0  # TRL 1.16 clamps (a−1)ρ here, so e^{(a−1)ρ} stays finite in float32


@FDIVS.register("reverse_kl")
def reverse_kl(rho, cfg):
    """g(ρ) = ρ (DPO)."""
    return rho


@FDIVS.register("forward_kl")
def forward_kl(rho, cfg):
    """g(ρ) = 1 − e^{−ρ} (f'(u) = 1 − 1/u)."""
    return -jnp.expm1(-rho)


@FDIVS.register("js_divergence")
def js_divergence(rho, cfg):
    """g(ρ) = log 2 + log σ(ρ) (f'(u) = log(2u/(1 + u)))."""
    return jnp.log(2.0) + jax.nn.log_sigmoid(rho)


@FDIVS.register("alpha_divergence", f_alpha=0.5)
def alpha_divergence(rho, cfg):
    """g(ρ) = (e^{(a−1)ρ} − 1)/(a − 1), TRL's coefficient a (= 1 − α of f-DPO), with the
    exponent clamped at 80 as TRL does (the score saturates, its gradient vanishes there)."""
    a = cfg.f_alpha
    return jnp.expm1(jnp.minimum((a - 1.0) * rho, ALPHA_EXPONENT_MAX)) / (a - 1.0)
