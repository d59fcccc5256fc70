"""Per-token quantities from logits: log-probs of targets, entropy, KL, log Σπ².

``token_*`` are the "naive" forms over full ``[..., T, V]`` logits, in float32 (or float64
under x64) whatever the logits' dtype. They are the ground truth that the chunked,
memory-lean paths must reproduce.

``chunked_token_*`` compute the same from final hidden states ``h`` and the unembedding
``w`` without ever holding ``[..., T, V]`` logits (levanter's blockwise cross-entropy and
MaxText's vocabulary tiling do the same for a scalar loss). The token axis is cut into
chunks of C; a chunk's logits ``[..., C, V]`` exist only inside one ``lax.scan`` step of
the forward and again (recomputed) in the backward, so peak memory is
O(prod(batch) · C · V) plus ``w`` and its gradient. The gradient w.r.t. the logits is
written by hand (``jax.custom_vjp``), so nothing per chunk is kept between the passes but
per-token scalars (log-normalisers, entropy, log Σπ²).

Shape legend: B pairs, T tokens, D model width, V vocabulary, C tokens per chunk.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _f32(x: Array) -> Array:
    """Upcast low-precision floats to float32; keep float32/float64 as they are."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def token_logps(logits: Float[Array, "... T V"], targets: Int[Array, "... T"]) -> Array:
    """log softmax(logits)[target] per position: target logit minus an f32 logsumexp."""
    logits = _f32(logits)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: Float[Array, "... T V"]) -> Float[Array, "... T"]:
    """Entropy H(π(·|y_<t)) per position."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_kl(
    ref_logits: Float[Array, "... T V"], logits: Float[Array, "... T V"]
) -> Float[Array, "... T"]:
    """Forward KL(π_ref ‖ π_θ) per position (TDPO's and SparsePO's direction, mathematics §0.3)."""
    ref_logp = jax.nn.log_softmax(_f32(ref_logits), axis=-1)
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)


def token_logsumsq(logits: Float[Array, "... T V"]) -> Float[Array, "... T"]:
    """log Σ_v π(v|y_<t)² per position (WPO's weight, mathematics §2.25)."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jax.nn.logsumexp(2.0 * logp, axis=-1)


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`chunked_token_stats`; a field not asked for is None."""

    logps: Float[Array, "... T"] | None = None
    entropy: Float[Array, "... T"] | None = None
    kl: Float[Array, "... T"] | None = None
    logsumsq: Float[Array, "... T"] | None = None


def chunked_token_stats(
    h: Float[Array, "... T D"],
    w: Float[Array, "D V"],
    targets: Int[Array, "... T"] | None = None,
    *,
    entropy: bool = False,
    logsumsq: bool = False,
    ref_h: Float[Array, "... T D"] | None = None,
    ref_w: Float[Array, "D V"] | None = None,
    chunk_size: int = 256,
) -> TokenStats:
    """Several per-token quantities of π = softmax(h @ w) in one chunked pass.

    Equal (values and gradients w.r.t. ``h`` and ``w``) to :func:`token_logps`,
    :func:`token_entropy`, :func:`token_kl` and :func:`token_logsumsq` applied to
    ``logits = h @ w``, but the logits are only ever formed ``chunk_size`` tokens at a time.

    Args:
      h: final hidden states; any leading (batch) axes, then tokens T, then width D.
        Leading axes are kept whole in every chunk (so a batch-sharded ``h`` stays sharded).
      w: unembedding [D, V] (for tied embeddings pass ``embedding.T``).
      targets: token ids [..., T]; when given, ``logps`` = log π(target).
      entropy: also return H(π) per token.
      logsumsq: also return log Σ_v π(v)² per token (WPO).
      ref_h, ref_w: the reference model's hidden states and unembedding; when given, also
        return the forward KL(π_ref ‖ π) per token. The reference is frozen: no gradient
        flows into ``ref_h`` or ``ref_w`` (as if wrapped in ``jax.lax.stop_gradient``).
      chunk_size: tokens per chunk C. Peak extra memory is a few prod(batch)·C·V floats.
        T need not be a multiple of C (the last chunk is padded internally and dropped).

    Returns:
      :class:`TokenStats` of float32 arrays [..., T] (float64 under x64 with float64 inputs),
      whatever the dtype of ``h`` and ``w``: logits are accumulated and normalised in float32.
    """
    if (ref_h is None) != (ref_w is None):
        raise ValueError("chunked_token_stats: pass both ref_h and ref_w, or neither")
    if h.shape[-1] != w.shape[0]:
        raise ValueError(f"chunked_token_stats: h width {h.shape[-1]} != w rows {w.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunked_token_stats: chunk_size must be >= 1, got {chunk_size}")
    want = (targets is not None, entropy, ref_h is not None, logsumsq)
    if not any(want):
        raise ValueError("chunked_token_stats: nothing asked for")
    if targets is None:
        targets = jnp.zeros(h.shape[:-1], jnp.int32)
    elif targets.shape != h.shape[:-1]:
        raise ValueError(f"chunked_token_stats: targets {targets.shape} vs h {h.shape}")
    if ref_h is not None:
        if (
            ref_h.shape[:-1] != h.shape[:-1]
            or ref_w.shape[1] != w.shape[1]
            or ref_h.shape[-1] != ref_w.shape[0]
        ):
            raise ValueError("chunked_token_stats: reference shapes do not match the policy's")
        ref_h, ref_w = jax.lax.stop_gradient(ref_h), jax.lax.stop_gradient(ref_w)
    outs = _chunked_stats(want, min(chunk_size, h.shape[-2]), h, w, targets, ref_h, ref_w)
    it = iter(outs)
    return TokenStats(*(next(it) if wanted else None for wanted in want))


def chunked_token_logps(
    h: Float[Array, "... T D"],
    w: Float[Array, "D V"],
    targets: Int[Array, "... T"],
    *,
    chunk_size: int = 256,
) -> Float[Array, "... T"]:
    """:func:`token_logps` of ``h @ w`` without [..., T, V] logits."""
    return chunked_token_stats(h, w, targets, chunk_size=chunk_size).logps


def chunked_token_entropy(
    h: Float[Array, "... T D"], w: Float[Array, "D V"], *, chunk_size: int = 256
) -> Float[Array, "... T"]:
    """:func:`token_entropy` of ``h @ w`` without [..., T, V] logits."""
    return chunked_token_stats(h, w, entropy=True, chunk_size=chunk_size).entropy


def chunked_token_kl(
    ref_h: Float[Array, "... T D"],
    ref_w: Float[Array, "D V"],
    h: Float[Array, "... T D"],
    w: Float[Array, "D V"],
    *,
    chunk_size: int = 256,
) -> Float[Array, "... T"]:
    """:func:`token_kl` (forward KL(π_ref ‖ π)) of ``ref_h @ ref_w`` and ``h @ w``, chunked.

    The gradient flows into ``h`` and ``w`` only; the reference side is treated as frozen.
    """
    return chunked_token_stats(h, w, ref_h=ref_h, ref_w=ref_w, chunk_size=chunk_size).kl


def chunked_token_logsumsq(
    h: Float[Array, "... T D"], w: Float[Array, "D V"], *, chunk_size: int = 256
) -> Float[Array, "... T"]:
    """:func:`token_logsumsq` (log Σ_v π(v)²) of ``h @ w`` without [..., T, V] logits."""
    return chunked_token_stats(h, w, logsumsq=True, chunk_size=chunk_size).logsumsq


def _acc_dtype(*xs: Array) -> jnp.dtype:
    """float32 accumulation for low-precision inputs, float64 kept under x64."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _logits(h_c: Array, w: Array) -> Array:
    return jnp.einsum("...cd,dv->...cv", h_c, w, preferred_element_type=_acc_dtype(h_c, w))


def _to_chunks(x: Array, chunk: int, axis: int) -> Array:
    """[..., T, *rest] -> [n, ..., C, *rest], zero-padding T up to n·C."""
    axis = axis % x.ndim
    t = x.shape[axis]
    n = -(-t // chunk)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * chunk - t)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _from_chunks(x: Array, t: int, axis: int) -> Array:
    """Inverse of :func:`_to_chunks` (``axis`` counts in the unchunked array)."""
    axis = axis % (x.ndim - 1)
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, t, axis=axis)


def _chunk_forward(want, z, y, zr):
    """Per-token outputs (in ``want`` order) and backward residuals from one chunk of logits."""
    want_lp, want_ent, want_kl, want_sq = want
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[..., None]
    outs, res = [], [lse]
    if want_lp:
        outs.append(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0])
    if want_ent:
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        outs.append(ent)
        res.append(ent)
    if want_kl:
        lse_r = jax.nn.logsumexp(zr, axis=-1)
        logq = zr - lse_r[..., None]
        outs.append(jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1))
        res.append(lse_r)
    if want_sq:
        sq = jax.nn.logsumexp(2.0 * logp, axis=-1)
        outs.append(sq)
        res.append(sq)
    return tuple(outs), tuple(res)


def _chunk_dlogits(want, z, y, zr, res, cts):
    """d(Σ cotangent · outputs)/d logits for one chunk, from the saved per-token residuals.

    With p = softmax(z), q = softmax(z_ref), r = softmax(2z) = p²/Σp²:
      ∂ log p_y / ∂z = onehot(y) − p;  ∂H/∂z = −p (log p + H);
      ∂KL(q‖p)/∂z = p − q;             ∂ log Σp² / ∂z = 2 (r − p).
    """
    want_lp, want_ent, want_kl, want_sq = want
    res, cts = list(res), list(cts)
    logp = z - res.pop(0)[..., None]
    p = jnp.exp(logp)
    coef = jnp.zeros(z.shape[:-1], z.dtype)  # dz = p·coef + extra
    extra = jnp.zeros((), z.dtype)
    if want_lp:
        g = cts.pop(0)
        coef = coef - g
        onehot = jax.lax.broadcasted_iota(y.dtype, z.shape, z.ndim - 1) == y[..., None]
        extra = extra + jnp.where(onehot, g[..., None], 0.0)
    if want_ent:
        g, ent = cts.pop(0), res.pop(0)
        d = -g[..., None] * p * (logp + ent[..., None])
        extra = extra + d
    if want_kl:
        g, lse_r = cts.pop(0), res.pop(0)
        coef = coef + g
        extra = extra - g[..., None] * jnp.exp(zr - lse_r[..., None])
    if want_sq:
        g, sq = cts.pop(0), res.pop(0)
        coef = coef - 2.0 * g
        extra = extra + 2.0 * g[..., None] * jnp.exp(2.0 * logp - sq[..., None])
    return p * coef[..., None] + extra


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_stats(want, chunk, h, w, y, ref_h, ref_w):
    return _chunked_stats_fwd(want, chunk, h, w, y, ref_h, ref_w)[0]


def _chunked_stats_fwd(want, chunk, h, w, y, ref_h, ref_w):
    t = h.shape[-2]
    xs = (_to_chunks(h, chunk, -2), _to_chunks(y, chunk, -1))
    if want[2]:
        xs += (_to_chunks(ref_h, chunk, -2),)

    def step(_, x):
        z = _logits(x[0], w)
        zr = _logits(x[2], ref_w) if want[2] else None
        return None, _chunk_forward(want, z, x[1], zr)

    _, (outs, res) = jax.lax.scan(step, None, xs)
    outs = tuple(_from_chunks(o, t, -1) for o in outs)
    return outs, (h, w, y, ref_h, ref_w, res)


def _chunked_stats_bwd(want, chunk, saved, cts):
    h, w, y, ref_h, ref_w, res = saved
    t = h.shape[-2]
    cts = tuple(_to_chunks(g.astype(r.dtype), chunk, -1) for g, r in zip(cts, res))
    xs = (_to_chunks(h, chunk, -2), _to_chunks(y, chunk, -1), res, cts)
    if want[2]:
        xs += (_to_chunks(ref_h, chunk, -2),)
    cdt = jnp.result_type(h, w)

    def step(dw, x):
        h_c, y_c, res_c, cts_c = x[:4]
        z = _logits(h_c, w)
        zr = _logits(x[4], ref_w) if want[2] else None
        dz = _chunk_dlogits(want, z, y_c, zr, res_c, cts_c).astype(cdt)
        dh = jnp.einsum("...cv,dv->...cd", dz, w, preferred_element_type=dw.dtype)
        dw = dw + jnp.einsum("...cd,...cv->dv", h_c, dz, preferred_element_type=dw.dtype)
        return dw, dh.astype(h.dtype)

    dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, _acc_dtype(h, w)), xs)
    return _from_chunks(dh, t, -2), dw.astype(w.dtype), None, None, None


_chunked_stats.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)
