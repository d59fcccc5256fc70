"""Shared pieces of the derivation and property tests (mathematics §3).

Float64 NumPy references (closed forms, enumerable bandits, an enumerable tiny LM) and the
bridge that evaluates population losses through OUR :func:`mipo_jax.losses.mipo_loss`.
Everything that builds JAX arrays here must run under ``jax.enable_x64(True)``.

Bandit notation (mathematics §3): prompts x with weights ρ(x), responses y ∈ {0..K-1}, reward
r(x, y), reference π_ref(·|x), pair-sampling distribution μ(·|x), all with full support.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from mipo_jax.losses import mipo_loss
from mipo_jax.types import TokenInputs

# --------------------------------------------------------------------------------------
# NumPy float64 closed forms
# --------------------------------------------------------------------------------------


def log_sigmoid(z):
    """log σ(z) = −softplus(−z), stable for both signs."""
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def sigmoid(z):
    return np.exp(log_sigmoid(z))


def log_softmax(a, axis=-1):
    a = np.asarray(a, np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    return a - m - np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))


def softmax(a, axis=-1):
    return np.exp(log_softmax(a, axis))


def entropy(p, axis=-1):
    """Shannon entropy in nats, 0 log 0 = 0."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def kl(p, q, axis=-1):
    """KL(p ‖ q) in nats (q must have full support where p does)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), axis)


def binary_entropy(p):
    return entropy(np.stack([p, 1.0 - p]), axis=0)


def gibbs(log_base, r, temperature):
    """π(y|x) ∝ base(y|x)·exp(r(x,y)/temperature), normalised over the last axis."""
    return softmax(log_base + r / temperature)


# --------------------------------------------------------------------------------------
# Bandits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandit:
    rho: np.ndarray  # [X] prompt weights
    r: np.ndarray  # [X, K] rewards
    ref: np.ndarray  # [X, K] π_ref
    mu: np.ndarray  # [X, K] pair-sampling distribution

    @property
    def n_x(self) -> int:
        return self.r.shape[0]

    @property
    def k(self) -> int:
        return self.r.shape[1]


def make_bandit(seed: int, n_x: int = 3, k: int = 5, r=None) -> Bandit:
    rng = np.random.default_rng(seed)
    return Bandit(
        rho=rng.dirichlet(np.full(n_x, 3.0)),
        r=rng.normal(size=(n_x, k)) if r is None else np.asarray(r, np.float64),
        ref=rng.dirichlet(np.full(k, 2.0), size=n_x),
        mu=rng.dirichlet(np.full(k, 3.0), size=n_x),
    )


def reward_objective(b: Bandit, pi, log_prior, beta):
    """F(π) = E_x[E_π r − β KL(π(·|x) ‖ prior(·|x))] (mathematics §3.1; prior unnormalised
    allowed)."""
    pi = np.asarray(pi, np.float64)
    per_x = np.sum(pi * (b.r - beta * (np.log(pi) - log_prior)), axis=-1)
    return float(np.sum(b.rho * per_x))


def population_pairs(b: Bandit):
    """All ordered (x, y_w, y_l) with their population weight (mathematics §3.2).

    Pairs (y1, y2) ~ μ(·|x)² with label y1 ≻ y2 w.p. σ(r1 − r2); listing both labellings of
    every ordered pair gives weight ρ μ(y1) μ(y2) σ(±Δr), summing to 1.
    """
    x, y1, y2 = np.meshgrid(np.arange(b.n_x), np.arange(b.k), np.arange(b.k), indexing="ij")
    x, y1, y2 = x.ravel(), y1.ravel(), y2.ravel()
    base = b.rho[x] * b.mu[x, y1] * b.mu[x, y2]
    p12 = sigmoid(b.r[x, y1] - b.r[x, y2])
    xs = np.concatenate([x, x])
    win = np.concatenate([y1, y2])
    lose = np.concatenate([y2, y1])
    weight = np.concatenate([base * p12, base * (1.0 - p12)])
    return xs, win, lose, weight


def bayes_risk(b: Bandit) -> float:
    """E[H_b(σ(Δr))]: the population logistic loss of the true BT model (mathematics §3.2)."""
    dr = b.r[:, :, None] - b.r[:, None, :]
    w = b.rho[:, None, None] * b.mu[:, :, None] * b.mu[:, None, :]
    return float(np.sum(w * binary_entropy(sigmoid(dr))))


def population_loss(b: Bandit, cfg, *, log_ref=None, prior=None, mi=False, mi_sg=True):
    """Population loss of a tabular policy, evaluated pair by pair by OUR ``mipo_loss``.

    Returns ``f(theta [X, K], phi [K] or None) -> scalar``: Σ_pairs weight · mipo_loss(pair),
    with log π = log_softmax(θ_x), T = 1 token per response.

    Args:
      log_ref: [X, K] per-prompt log-scores for the ``reference`` field (default log π_ref).
      prior: ``"param"``: the prompt-free learnable prior log ζ_φ = log_softmax(φ) goes into
        the ``prior`` field (prior ``learned``); an array [K]: a fixed prompt-free log ζ.
      mi: also fill ``prior_samples`` with log ζ_φ of every response y, weighted by the exact
        policy marginal p_π(y) = Σ_x ρ(x) π(y|x) under stop_gradient (the MI term's
        sampling weights). Every per-pair call adds the same MI term; the pair weights sum
        to 1, so the weighted sum carries it exactly once.
      mi_sg: keep the sampling weights constant (the default, as Monte-Carlo samples are);
        ``False`` lets the gradient flow into π through p_π (a misuse, tested as such).
    """
    xs, win, lose, weight = population_pairs(b)
    log_ref = np.log(b.ref) if log_ref is None else np.asarray(log_ref, np.float64)
    ref_pairs = np.stack([log_ref[xs, win], log_ref[xs, lose]], -1)
    mask = jnp.ones((1, 2, 1))

    def loss(theta, phi=None):
        logpi = jax.nn.log_softmax(theta, axis=-1)
        pol = jnp.stack([logpi[xs, win], logpi[xs, lose]], axis=-1)
        if isinstance(prior, str):
            log_zeta = jax.nn.log_softmax(phi)
        elif prior is not None:
            log_zeta = jnp.asarray(prior)
        extra = {}
        if mi:
            p_marg = jnp.sum(jnp.asarray(b.rho)[:, None] * jnp.exp(logpi), axis=0)
            extra = dict(
                prior_samples=log_zeta[:, None],
                prior_samples_mask=jnp.ones((b.k, 1)),
                prior_samples_weight=jax.lax.stop_gradient(p_marg) if mi_sg else p_marg,
            )

        def one(pol2, ref2, pri2):
            inputs = TokenInputs(
                policy=pol2[None, :, None],
                mask=mask,
                reference=ref2[None, :, None],
                prior=None if prior is None else pri2[None, :, None],
                **extra,
            )
            return mipo_loss(inputs, cfg)[0]

        pri = (
            jnp.zeros_like(pol)
            if prior is None
            else jnp.stack([log_zeta[win], log_zeta[lose]], axis=-1)
        )
        per_pair = jax.vmap(one)(pol, jnp.asarray(ref_pairs), pri)
        return jnp.sum(jnp.asarray(weight) * per_pair)

    return loss


def bfgs(fun, x0, gtol=1e-12, maxiter=10_000):
    """scipy BFGS on a JAX scalar function of a flat float64 vector (value and jax.grad)."""
    vg = jax.jit(jax.value_and_grad(fun))

    def f(v):
        val, grad = vg(jnp.asarray(v))
        return float(val), np.asarray(grad, np.float64)

    res = scipy.optimize.minimize(
        f,
        np.asarray(x0, np.float64),
        jac=True,
        method="BFGS",
        options=dict(gtol=gtol, maxiter=maxiter),
    )
    return res.x


def blahut_arimoto(b: Bandit, beta_mi: float, zeta0=None, iters: int = 20_000, tol=1e-15):
    """π ∝ ζ e^{β r}, ζ ← Σ_x ρ π (mathematics §1.2, §3.7). Returns (π, ζ, history of objectives).

    The history holds F(π_k, ζ_{k−1}) and F(π_k, ζ_k) alternately, F(π, ζ) =
    E[r] − (1/β) E_x KL(π‖ζ): each half-step maximises F in one block.
    """
    zeta = np.full(b.k, 1.0 / b.k) if zeta0 is None else np.asarray(zeta0, np.float64)
    history = []
    for _ in range(iters):
        pi = gibbs(np.log(zeta)[None, :], b.r, 1.0 / beta_mi)
        history.append(reward_objective(b, pi, np.log(zeta)[None, :], 1.0 / beta_mi))
        new = b.rho @ pi
        history.append(reward_objective(b, pi, np.log(new)[None, :], 1.0 / beta_mi))
        done = np.max(np.abs(new - zeta)) < tol
        zeta = new
        if done:
            break
    pi = gibbs(np.log(zeta)[None, :], b.r, 1.0 / beta_mi)
    return pi, zeta, np.array(history)


def mutual_information(rho, pi):
    """I(X;Y) = H(p_π) − Σ_x ρ(x) H(π(·|x)) (entropy form, independent of any KL code)."""
    return float(entropy(rho @ pi) - np.sum(rho * entropy(pi)))


# --------------------------------------------------------------------------------------
# Tiny autoregressive LM over {a, b, c, EOS}, max length 5 (mathematics §3.9)
# --------------------------------------------------------------------------------------

VOCAB = 4  # a, b, c, EOS
EOS = 3
MAX_LEN = 5


def all_prefixes():
    """Every string over {a, b, c} of length 0..MAX_LEN−1: the contexts a token is drawn in."""
    out = [()]
    for n in range(1, MAX_LEN):
        out += [p + (c,) for p in out if len(p) == n - 1 for c in range(3)]
    return out


def all_sequences():
    """Every complete response: w + EOS with |w| ≤ MAX_LEN−1, or a length-MAX_LEN string
    over {a, b, c} (stopped by the length limit). 121 + 243 = 364 sequences."""
    prefixes = all_prefixes()
    ended = [p + (EOS,) for p in prefixes]
    full = [p + (c,) for p in prefixes if len(p) == MAX_LEN - 1 for c in range(3)]
    return ended + full


def brute_force_logprob(table, index, seq):
    """log P(seq) by walking the token tree: Σ_t log softmax(table[prefix y_<t])[y_t]."""
    total = 0.0
    for t, tok in enumerate(seq):
        total += log_softmax(table[index[tuple(seq[:t])]])[tok]
    return total


def token_arrays(sequences, table, index):
    """Padded ids [N, T], mask [N, T] and per-position logits [N, T, V] from a prefix table."""
    n = len(sequences)
    ids = np.zeros((n, MAX_LEN), np.int32)
    mask = np.zeros((n, MAX_LEN))
    logits = np.repeat(table[index[()]][None, None, :], MAX_LEN, axis=1).repeat(n, axis=0)
    for i, seq in enumerate(sequences):
        for t, tok in enumerate(seq):
            ids[i, t], mask[i, t] = tok, 1.0
            logits[i, t] = table[index[tuple(seq[:t])]]
    return ids, mask, logits
