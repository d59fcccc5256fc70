"""Link functions: how a pair's implicit rewards become a per-pair loss.

MI-DPO proper is the ``sigmoid`` link (−log σ(z)). The others are TRL's loss types written
on the same implicit reward r(y) = α·s(y), s the score of the log-ratio S^π(y) − log ζ(y)
(``mipo.scores``; mathematics §2.9–2.12, §2.20–23): a link sees ``Scores`` and returns the loss of
each pair, ``[B]``. Formulas follow TRL 1.16 ``DPOTrainer._compute_loss``; TRL's ``beta`` is
our ``alpha``. ``label_smoothing`` is read by the links that declare it (robust, exo_pair,
aot, aot_unpaired, and cdpo, our cDPO): TRL's ``sigmoid`` has none.
"""

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from mipo_jax.registry import Registry

LINKS = Registry("link")
log_sigmoid = jax.nn.log_sigmoid


# Links that read a pair only through its score difference (z, or h = s_w − s_l): the ones
# an f-divergence score generalises to. TRL 1.16 rejects a score on the others ("The f-DPO
# reparameterization leaves a β·log Z(x) term that only cancels in the chosen-rejected reward
# difference"), and so does ``losses.validate``.
DIFFERENCE_LINKS = ("sigmoid", "cdpo", "hinge", "ipo", "exo_pair", "robust", "discopop")


@struct.dataclass
class Scores:
    """Per-pair scores on the pair axis ``[B, 2]`` (index 0 chosen); n(y) = |y| under
    ``normalize='mean'``, 1 under 'sum'."""

    policy: Float[Array, "B 2"]  # S^π(y) / n(y)
    prior: Float[Array, "B 2"]  # log ζ(y) / n(y)
    logratio: Float[Array, "B 2"]  # ρ(y) = S^π(y) − log ζ(y), summed (TRL's *_logratios)
    score: Float[Array, "B 2"]  # g(ρ)/n (trl_order) or g(ρ/n): what the links read
    rewards: Float[Array, "B 2"]  # alpha · score
    margin: Float[Array, ""]  # subtracted from z (SimPO γ)
    valid: Float[Array, " B"]  # 1 for pairs that count; batch-coupled links sort only these

    @property
    def z(self) -> Float[Array, " B"]:
        """The MI-DPO logit α[(log π − log ζ)_w − (log π − log ζ)_l] − margin."""
        return self.rewards[:, 0] - self.rewards[:, 1] - self.margin


def _smoothed_logistic(u, eps):
    return -(1.0 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)


@LINKS.register("sigmoid")
def sigmoid(s, cfg):
    """DPO / MI-DPO: −log σ(z) (TRL's ``sigmoid``: no label smoothing)."""
    return -log_sigmoid(s.z)


@LINKS.register("cdpo", label_smoothing=0.1)
def cdpo(s, cfg):
    """cDPO (Mitchell 2023, Eq. 3): −(1−ε) log σ(z) − ε log σ(−z), soft labels ε =
    ``label_smoothing`` (TRL v0.19's ``sigmoid`` with label smoothing)."""
    return _smoothed_logistic(s.z, cfg.label_smoothing)


@LINKS.register("robust", label_smoothing=0.0)
def robust(s, cfg):
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)."""
    eps = cfg.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(s.z) + eps * log_sigmoid(-s.z)) / (1.0 - 2.0 * eps)


@LINKS.register("hinge")
def hinge(s, cfg):
    """SLiC / RSO hinge: max(0, 1 − z)."""
    return jax.nn.relu(1.0 - s.z)


@LINKS.register("ipo")
def ipo(s, cfg):
    """IPO (Azar et al. 2023, Eq. 17): (h − 1/(2τ))² with τ = alpha and h = s_w − s_l.

    TRL averages the scores per token (use ``normalize='mean'``, as configs/ipo.py does).
    """
    h = s.score[:, 0] - s.score[:, 1]
    return (h - 1.0 / (2.0 * cfg.alpha)) ** 2


@LINKS.register("exo_pair", label_smoothing=1e-3)
def exo_pair(s, cfg):
    """EXO (Ji et al. 2024): σ(z)[log σ(z) − log(1−ε)] + σ(−z)[log σ(−z) − log ε], ε > 0."""
    eps, z = cfg.label_smoothing, s.z
    return jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        log_sigmoid(-z) - jnp.log(eps)
    )


@LINKS.register("nca_pair")
def nca_pair(s, cfg):
    """NCA (Chen et al. 2024): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)."""
    rw, rl = s.rewards[:, 0], s.rewards[:, 1]
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


@LINKS.register("bco_pair")
def bco_pair(s, cfg):
    """BCO, TRL HEAD form (no running mean δ): −log σ(r_w) − log σ(−r_l)."""
    return -log_sigmoid(s.rewards[:, 0]) - log_sigmoid(-s.rewards[:, 1])


@LINKS.register("sppo_hard")
def sppo_hard(s, cfg):
    """SPPO-hard (Wu et al. 2024): (ρ_w − 1/(2α))² + (ρ_l + 1/(2α))²."""
    half = 0.5 / cfg.alpha
    return (s.score[:, 0] - half) ** 2 + (s.score[:, 1] + half) ** 2


@LINKS.register("apo_zero")
def apo_zero(s, cfg):
    """APO-zero (D'Oosterlinck et al. 2024): (1 − σ(r_w)) + σ(r_l)."""
    return 1.0 - jax.nn.sigmoid(s.rewards[:, 0]) + jax.nn.sigmoid(s.rewards[:, 1])


@LINKS.register("apo_down")
def apo_down(s, cfg):
    """APO-down: σ(r_w) + (1 − σ(r_w − r_l))."""
    return jax.nn.sigmoid(s.rewards[:, 0]) + 1.0 - jax.nn.sigmoid(s.rewards[:, 0] - s.rewards[:, 1])


@LINKS.register("discopop", discopop_tau=0.05)
def discopop(s, cfg):
    """DiscoPOP (Chris Lu et al. 2024): (1 − σ(z/τ))(−log σ(z)) + σ(z/τ) e^{−z}.

    The second product is formed as exp(−z + log σ(z/τ)) so it never meets 0·∞.
    """
    z, tau = s.z, cfg.discopop_tau
    mod = jax.nn.sigmoid(z / tau)
    return (1.0 - mod) * -log_sigmoid(z) + jnp.exp(-z + log_sigmoid(z / tau))


def _sorted_delta_loss(a, b, s, cfg):
    """Logistic of alpha·(sort(a) − sort(b)) over the valid pairs only.

    Invalid (padding or empty) pairs are pushed past the end of both sorts, so the k-th
    smallest valid entries are paired; the loss at sorted position k is then assigned to the
    k-th valid pair, so summing over valid pairs sums over exactly the valid positions.
    """
    valid = s.valid > 0
    big = jnp.finfo(a.dtype).max
    a = jnp.sort(jnp.where(valid, a, big))
    b = jnp.sort(jnp.where(valid, b, big))
    in_range = jnp.arange(a.shape[0]) < jnp.sum(valid)
    delta = jnp.where(in_range, a - b, 0.0)
    per_position = _smoothed_logistic(cfg.alpha * delta, cfg.label_smoothing)
    rank = jnp.maximum(jnp.cumsum(valid) - 1, 0)
    return jnp.where(valid, per_position[rank], 0.0)


@LINKS.register("aot", label_smoothing=0.0)
def aot(s, cfg):
    """AOT paired (Melnyk et al. 2024): sort (S^π_w − S^π_l) and (log ζ_w − log ζ_l) over the
    batch's valid pairs separately, subtract, then a (smoothed) logistic of alpha·Δ. Couples
    the batch, so it is not exact under gradient accumulation."""
    return _sorted_delta_loss(
        s.policy[:, 0] - s.policy[:, 1], s.prior[:, 0] - s.prior[:, 1], s, cfg
    )


@LINKS.register("aot_unpaired", label_smoothing=0.0)
def aot_unpaired(s, cfg):
    """AOT unpaired (TRL v0.19 ``aot_pair``): sort ρ_w and ρ_l separately, subtract."""
    return _sorted_delta_loss(s.score[:, 0], s.score[:, 1], s, cfg)
