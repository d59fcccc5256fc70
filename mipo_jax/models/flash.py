"""Blockwise (flash-style) self-attention in pure JAX, with memory linear in the row length.

``flash_attention(q, k, v, mask, scale=, block=, span=)`` equals softmax attention under
`masks.SegmentMask` (segment ids for packing, the shared-prompt ``attend_to``, a sliding
window over positions) but never holds a ``[T, T]`` array. The row is cut into ``n`` blocks
of ``block`` tokens; query block ``i`` reads key blocks ``i - d`` for ``d < D``, with
``D = n`` (causality: no query sees a later block) or ``(span - 1) / block + 1`` when the
caller bounds how far back any token attends (packed rows: the longest unit). The work runs
along block diagonals: diagonal ``d`` (``n - d`` block pairs) goes together with diagonal
``D - d`` (``n - D + d`` pairs), so every step of a `lax.scan` handles ``2n - D`` pairs in
one batched matmul, whatever ``d``: no masked-out block is computed, the compiled program
does not grow with T, and the largest temporary is about ``[B, H, 2T, block]``.

Forward: an online softmax over the diagonals keeps, per query, the running maximum ``m``,
the sum ``z`` of ``exp(s - m)`` and the unnormalised output; it returns ``acc / z`` and saves
only ``lse = m + log z`` (FlashAttention-2, Dao 2023, Alg. 1). When the row is one block
(one diagonal) the probabilities are normalised before the value matmul instead, as
transformers computes them, so short sequences round as transformers' do.

Backward (a ``jax.custom_vjp``): recomputes each diagonal's scores and
``P = exp(s - lse)`` from the saved ``lse`` and, with ``Δ = rowsum(dO ∘ O)``,
``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - Δ)``, ``dQ += scale · dS K``, ``dK += scale · dSᵀ Q``
(FlashAttention-2, Alg. 2). Saved for the backward: q, k, v, the output and ``lse``, all
linear in T.

Queries that see no key (padding) get a zero output and zero gradients. Scores, the softmax
and the accumulators are float32 (float64 for float64 inputs); matmul operands stay in the
compute dtype.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mipo_jax.models.layers import load, store
from mipo_jax.models.masks import SegmentMask


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: SegmentMask,
    *,
    scale: float,
    block: int = 512,
    span: int | None = None,
) -> jax.Array:
    """Self-attention ``q [B,T,H,K]``, ``k/v [B,T,N,K]`` (H a multiple of N) -> ``[B,T,H,K]``.

    ``block``: tokens per query and key block (0, or >= T: one block). ``span``: the caller's
    promise that no query sees a key more than ``span - 1`` places before it (see
    `masks.attention_span`); key blocks further back are skipped.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    if h % n_kv:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {n_kv}")
    blk = t if block <= 0 or block >= t else block
    pad = -t % blk
    seg, pos, att = mask.segment_ids, mask.positions, mask.attend_to
    if pad:  # padding keys belong to segment 0: nobody sees them
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q, k, v = (jnp.pad(x, widths(x)) for x in (q, k, v))
        seg = jnp.pad(seg, widths(seg))
        pos, att = (_opt(x, lambda x: jnp.pad(x, widths(x))) for x in (pos, att))
    n = (t + pad) // blk
    diagonals = n if span is None else min(n, -(-(span - 1) // blk) + 1)
    static = _Static(float(scale), blk, diagonals, mask.sliding_window)
    split = lambda x: x.reshape(b, n, blk, *x.shape[2:])
    q = q.reshape(b, n, blk, n_kv, h // n_kv, d)
    out = _flash(static, q, split(k), split(v), split(seg), _opt(pos, split), _opt(att, split))
    return out.reshape(b, t + pad, h, d)[:, :t]


def _opt(x, f):
    return None if x is None else f(x)


class _Static(tuple):
    """Hashable static arguments: (scale, block, diagonals, window)."""

    def __new__(cls, scale: float, block: int, diagonals: int, window: int | None):
        return super().__new__(cls, (scale, block, diagonals, window))

    scale = property(lambda self: self[0])
    block = property(lambda self: self[1])
    diagonals = property(lambda self: self[2])
    window = property(lambda self: self[3])


# Blocked layouts: q, dq, out: [B, n, x, N, G, K]; k, v: [B, n, y, N, K]; ids: [B, n, x];
# scores and probabilities: [B, P, N, G, x, y] for P (query block, key block) pairs; row
# statistics: [B, n, N, G, x].
_QK = "bixngk,biynk->bingxy"
_PV = "bingxy,biynk->bixngk"
_PT = "bingxy,bixngk->biynk"


def _schedule(n: int, diagonals: int):
    """The block pairs ``(i, i - d)``, ``0 <= d < diagonals``, as steps of (query blocks, key
    blocks): static slices, or index arrays inside the scan.

    Returns (first, folded, middle): ``first`` is diagonal 0 (causal inside each block);
    ``folded(d)`` pairs diagonal ``d`` (``n - d`` pairs) with diagonal ``diagonals - d``
    (``n - diagonals + d`` pairs), ``2n - diagonals`` pairs whatever ``d``, so one
    `lax.scan` step runs it for every ``d`` in ``1 .. (diagonals - 1) // 2``; ``middle`` is
    diagonal ``diagonals / 2`` when that is a whole number, else None.
    """
    first = (slice(None), slice(None))
    middle = None
    if diagonals % 2 == 0:
        h = diagonals // 2
        middle = (slice(h, None), slice(0, n - h))

    def folded(d):
        p = jnp.arange(2 * n - diagonals, dtype=jnp.int32)
        head = p < n - d
        qi = jnp.where(head, d + p, p + diagonals - n)
        ki = jnp.where(head, p, p - n + d)
        return qi, ki

    return first, folded, middle


def _acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _pair_mask(static: _Static, seg, pos, att, qi, ki, causal: bool) -> jax.Array:
    """``[B, P, 1, 1, x, y]``: may query block ``qi`` read key block ``ki`` (pairwise)."""
    sq, sk = seg[:, qi, :, None], seg[:, ki, None, :]
    same = sk == sq
    if att is not None:
        same = same | (sk == att[:, qi, :, None])
    mask = same & (sq > 0) & (sk > 0)
    if causal:  # a block with itself: causal inside it
        blk = static.block
        mask = mask & jnp.asarray(np.tril(np.ones((blk, blk), bool)))[None, None]
    if static.window is not None:
        mask = mask & (pos[:, qi, :, None] - pos[:, ki, None, :] < static.window)
    return mask[:, :, None, None]


def _scores(static: _Static, q, k, mask) -> jax.Array:
    s = jnp.einsum(_QK, q, k, preferred_element_type=_acc_dtype(q))
    return jnp.where(mask, s * static.scale, jnp.finfo(s.dtype).min)


def _pairs(static, q, k, v, seg, pos, att, qi, ki, causal):
    """(mask, scores, q, v-side operands) of the block pairs ``(qi, ki)``."""
    mask = _pair_mask(static, seg, pos, att, qi, ki, causal)
    qq, kk, vv = q[:, qi], k[:, ki], v[:, ki]
    return mask, _scores(static, qq, kk, mask), qq, kk, vv


def _forward(static: _Static, q, k, v, seg, pos, att):
    """(output in q's blocked layout and v's dtype, lse ``[B, n, N, G, x]``)."""
    acc_t = _acc_dtype(q)
    b, n, blk, nh, g, _ = q.shape
    first, folded, middle = _schedule(n, static.diagonals)
    if static.diagonals == 1:  # one key block per query block: normalise before PV
        mask, s, _, _, _ = _pairs(static, q, k, v, seg, pos, att, *first, True)
        m = jnp.max(s, axis=-1)
        e = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        z = jnp.sum(e, axis=-1)
        p = e / jnp.where(z > 0, z, 1.0)[..., None]
        out = jnp.einsum(_PV, p.astype(v.dtype), v, preferred_element_type=acc_t)
        return out.astype(v.dtype), _lse(m, z)

    def step(state, qi, ki, causal):
        m, z, acc = state
        mask, s, _, _, vv = _pairs(static, q, k, v, seg, pos, att, qi, ki, causal)
        m_new = m.at[:, qi].max(jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        e = jnp.where(mask, jnp.exp(s - m_new[:, qi, ..., None]), 0.0)
        pv = jnp.einsum(_PV, e.astype(v.dtype), vv, preferred_element_type=acc_t)
        z = (alpha * z).at[:, qi].add(jnp.sum(e, axis=-1))
        acc = (acc * _to_q_layout(alpha)).at[:, qi].add(pv)
        return m_new, z, acc

    state = (
        jnp.full((b, n, nh, g, blk), jnp.finfo(acc_t).min, acc_t),
        jnp.zeros((b, n, nh, g, blk), acc_t),
        jnp.zeros(q.shape, acc_t),
    )
    state = _run(step, state, first, folded, middle, static.diagonals)
    m, z, acc = state
    out = acc / _to_q_layout(jnp.where(z > 0, z, 1.0))
    return out.astype(v.dtype), _lse(m, z)


def _run(step, state, first, folded, middle, diagonals):
    """Apply ``step(state, qi, ki, causal)`` over the schedule (a scan for the folded part)."""
    state = step(state, *first, True)
    folds = (diagonals - 1) // 2
    if folds:
        body = lambda st, d: (step(st, *folded(d), False), None)
        state, _ = jax.lax.scan(body, state, jnp.arange(1, folds + 1, dtype=jnp.int32))
    if middle is not None:
        state = step(state, *middle, False)
    return state


def _lse(m, z):
    """log Σ exp(s): the backward's normaliser; rows that see nothing get 0 (never read)."""
    return jnp.where(z > 0, m + jnp.log(jnp.where(z > 0, z, 1.0)), 0.0)


def _to_q_layout(x):
    """Row statistics ``[B, n, N, G, x]`` -> ``[B, n, x, N, G, 1]``."""
    return jnp.transpose(x, (0, 1, 4, 2, 3))[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, seg, pos, att):
    return _forward(static, q, k, v, seg, pos, att)[0]


def _flash_fwd(static, q, k, v, seg, pos, att):
    out, lse = _forward(static, q, k, v, seg, pos, att)
    return out, (*store(q, k, v, out), seg, pos, att, lse)


def _flash_bwd(static, res, dout):
    *words, seg, pos, att, lse = res
    q, k, v, out = load(dout.dtype, *words)
    acc_t = _acc_dtype(q)
    dout = dout.astype(q.dtype)
    delta = jnp.sum(dout.astype(acc_t) * out.astype(acc_t), axis=-1)  # [B, n, x, N, G]
    delta = jnp.transpose(delta, (0, 1, 3, 4, 2))  # [B, n, N, G, x]
    first, folded, middle = _schedule(q.shape[1], static.diagonals)

    def step(grads, qi, ki, causal):
        dq, dk, dv = grads
        mask, s, qq, kk, vv = _pairs(static, q, k, v, seg, pos, att, qi, ki, causal)
        p = jnp.where(mask, jnp.exp(s - lse[:, qi, ..., None]), 0.0)
        do = dout[:, qi]
        dv = dv.at[:, ki].add(jnp.einsum(_PT, p.astype(do.dtype), do, preferred_element_type=acc_t))
        dp = jnp.einsum(_QK, do, vv, preferred_element_type=acc_t)
        ds = p * (dp - delta[:, qi, ..., None]) * static.scale
        dq = dq.at[:, qi].add(
            jnp.einsum(_PV, ds.astype(kk.dtype), kk, preferred_element_type=acc_t)
        )
        dk = dk.at[:, ki].add(
            jnp.einsum(_PT, ds.astype(qq.dtype), qq, preferred_element_type=acc_t)
        )
        return dq, dk, dv

    zeros = tuple(jnp.zeros(x.shape, acc_t) for x in (q, k, v))
    dq, dk, dv = _run(step, zeros, first, folded, middle, static.diagonals)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
