"""f-divergence scores g(ρ) (Wang et al. 2023, f-DPO; TRL HEAD ``f_divergence_type``).

The implicit log-ratio ρ = log π − log ζ is replaced by g(ρ) before any link. Only
``reverse_kl`` (g = ρ) is MI-DPO proper; the others generalise the score.
"""

import jax
import jax.numpy as jnp

from mipo_jax.registry import Registry

FDIVS = Registry("f_divergence")


@FDIVS.register("reverse_kl")
def reverse_kl(rho, cfg):
    """g(ρ) = ρ (DPO)."""
    return rho


@FDIVS.register("forward_kl")
def forward_kl(rho, cfg):
    """g(ρ) = −e^{−ρ}."""
    return -jnp.exp(-rho)


@FDIVS.register("js_divergence")
def js_divergence(rho, cfg):
    """g(ρ) = log σ(ρ)."""
    return jax.nn.log_sigmoid(rho)


@FDIVS.register("alpha_divergence", f_alpha=0.5)
def alpha_divergence(rho, cfg):
    """g(ρ) = (e^{(a−1)ρ} − 1)/(a − 1), TRL HEAD coefficient a (= 1 − α of f-DPO)."""
    a = cfg.f_alpha
    return jnp.expm1((a - 1.0) * rho) / (a - 1.0)
