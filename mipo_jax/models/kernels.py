"""Vendor attention kernels behind `masks.SegmentMask`: cuDNN (GPU) and Pallas splash (TPU).

Both compute exactly what `models.flash` computes where they support the mask, and fall back
to it where they do not:

* **cuDNN** (`jax.nn.dot_product_attention(implementation="cudnn")`, bfloat16/float16,
  head_dim ≤ 128 and a multiple of 8): causal attention over rows that hold **one sequence
  each**, right-padded (``query_seq_lengths``), with the sliding window as
  ``local_window_size``. Whether a batch's rows are like that is data, so it is checked on
  device and `jax.lax.cond` runs cuDNN or the pure-JAX flash attention; packed rows and
  ``attend_to`` (shared-prompt rows, known at trace time) always take the flash path.
* **Splash** (`jax.experimental.pallas.ops.tpu.splash_attention`): segment ids (packing),
  causality, and a local window for the span and the sliding window, over rows whose length
  is a multiple of 128. Its window counts row places, ours positions: they agree when
  positions rise by one inside every segment and each segment is one run (what
  `mipo_jax.data` produces); with a sliding window that is checked on device, as above.
  ``attend_to`` is not a splash mask (the flash path runs). Grouped-query attention runs the
  multi-query kernel once per key/value head.

Neither kernel has run on its hardware in this project's tests (no GPU or TPU was at hand):
the tests check the dispatch, the arguments (cuDNN's through the XLA implementation of the
same `jax.nn.dot_product_attention` call) and splash in Pallas' interpreter on the CPU.
"""

import functools
import logging

import jax
import jax.numpy as jnp

from mipo_jax.models.flash import flash_attention
from mipo_jax.models.masks import SegmentMask
from mipo_jax.sharding import logical_to_spec

log = logging.getLogger("mipo_jax.models")

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_unsupported(q: jax.Array, mask: SegmentMask) -> str | None:
    """Why cuDNN cannot run this call (known at trace time), or None."""
    if mask.attend_to is not None:
        return "attend_to (shared-prompt rows) is not a cuDNN mask"
    if q.dtype not in CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 inputs, not {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim > 128 or head_dim % 8:
        return f"cuDNN attention needs head_dim <= 128 and a multiple of 8, not {head_dim}"
    return None


def one_sequence_per_row(mask: SegmentMask) -> tuple[jax.Array, jax.Array]:
    """(every row is one sequence then padding, lengths ``[B]`` int32 at least 1).

    With a sliding window the positions must also rise by one along each sequence, since
    cuDNN's window counts places in the row.
    """
    seg = mask.segment_ids
    live = seg > 0
    t = seg.shape[1]
    lengths = jnp.sum(live, axis=1, dtype=jnp.int32)
    index = jnp.arange(t, dtype=jnp.int32)[None]
    ok = jnp.all(live == (index < lengths[:, None])) & jnp.all(~live | (seg == seg[:, :1]))
    if mask.sliding_window is not None:
        start = mask.positions[:, :1]
        ok = ok & jnp.all(~live | (mask.positions - index == start))
    return ok, jnp.maximum(lengths, 1)  # an empty row reads its first (padding) key: finite


def cudnn_attention(q, k, v, mask: SegmentMask, *, scale: float, implementation="cudnn"):
    """Causal attention of right-padded single-sequence rows through `jax.nn`'s cuDNN call.

    Only valid where `one_sequence_per_row` holds; padding queries get zeros.
    ``implementation="xla"`` runs the same call through XLA (the tests' stand-in).
    """
    _, lengths = one_sequence_per_row(mask)
    window = mask.sliding_window
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
    live = (mask.segment_ids > 0)[:, :, None, None]
    return jnp.where(live, out, jnp.zeros((), out.dtype))


def cudnn_or_flash(q, k, v, mask: SegmentMask, *, scale, block, span, implementation="cudnn"):
    """cuDNN where the rows allow it (checked on device), else `flash_attention`."""
    flash = functools.partial(flash_attention, mask=mask, scale=scale, block=block, span=span)
    reason = cudnn_unsupported(q, mask)
    if reason is not None:
        _fallback("cudnn", reason)
        return flash(q, k, v)
    ok, _ = one_sequence_per_row(mask)
    cudnn = functools.partial(
        cudnn_attention, mask=mask, scale=scale, implementation=implementation
    )
    return jax.lax.cond(ok, cudnn, flash, q, k, v)


# ---- splash (TPU) -----------------------------------------------------------------------


def splash_unsupported(q: jax.Array, mask: SegmentMask) -> str | None:
    if mask.attend_to is not None:
        return "attend_to (shared-prompt rows) is not a splash mask"
    if q.shape[1] % 128:
        return f"splash attention needs a row length that is a multiple of 128, not {q.shape[1]}"
    return None


def positions_follow_index(mask: SegmentMask) -> jax.Array:
    """Each segment is one run of the row and its positions rise by one along it."""
    seg, pos = mask.segment_ids, mask.positions
    prev, cur = seg[:, :-1], seg[:, 1:]
    steps = (cur != prev) | (cur == 0) | (pos[:, 1:] == pos[:, :-1] + 1)
    earlier = jax.lax.cummax(seg, axis=1)[:, :-1]
    fresh = (cur == prev) | (cur == 0) | (cur > earlier)
    return jnp.all(steps & fresh)


def _splash_kernel(t: int, group: int, left: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, t)) if left is None else sm.LocalMask((t, t), (left, 0), offset=0)
    blk = next(b for b in (512, 256, 128) if t % b == 0)
    sizes = sk.BlockSizes(
        block_q=blk, block_kv=blk, block_kv_compute=blk,
        block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
        block_q_dq=blk, block_kv_dq=blk,
    )  # fmt: skip
    mask = sm.MultiHeadMask([one] * group)
    with jax.ensure_compile_time_eval():  # its mask tables are constants
        return sk.make_splash_mqa(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def splash_attention(q, k, v, mask: SegmentMask, *, scale: float, span, interpret=False):
    """Splash attention of ``q [B,T,H,K]``, ``k/v [B,T,N,K]`` under segment ids and the
    index-counted window ``min(sliding_window, span)`` (padding queries get zeros)."""
    windows = [w for w in (mask.sliding_window, span) if w is not None]
    left = min(windows) - 1 if windows else None
    seg = mask.segment_ids
    qspec = kvspec = segspec = None
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        qspec = logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, mesh)
        kvspec = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh)
        if qspec[2] != kvspec[2]:  # heads split differently: give every query head its kv
            rep = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
            kvspec = qspec
        segspec = jax.sharding.PartitionSpec(qspec[0], None)
    # built outside shard_map (its constants must not belong to the manual mesh); the
    # sequence is never sharded, and query and kv heads are split alike or kv repeated
    kernel = _splash_kernel(q.shape[1], q.shape[2] // k.shape[2], left, interpret)

    def local(q, k, v, seg):
        b, t, h, d = q.shape
        n = k.shape[2]
        qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, n, h // n, d)
        qg = jnp.transpose(qg, (0, 2, 3, 1, 4))  # [B, N, G, T, K]
        kn, vn = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))  # [B, N, T, K]
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

        ids = splash_attention_kernel.SegmentIds(q=seg, kv=seg)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
        out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kn, vn, ids)  # over rows
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
        return jnp.where((seg > 0)[:, :, None, None], out, jnp.zeros((), out.dtype))

    if qspec is None:
        return local(q, k, v, seg)
    sharded = jax.shard_map(
        local, in_specs=(qspec, kvspec, kvspec, segspec), out_specs=qspec, check_vma=False
    )
    return sharded(q, k, v, seg)


def splash_or_flash(q, k, v, mask: SegmentMask, *, scale, block, span, interpret=False):
    """Splash where the mask allows it, else `flash_attention`."""
    flash = functools.partial(flash_attention, mask=mask, scale=scale, block=block, span=span)
    reason = splash_unsupported(q, mask)
    if reason is not None:
        _fallback("splash", reason)
        return flash(q, k, v)
    splash = functools.partial(
        splash_attention, mask=mask, scale=scale, span=span, interpret=interpret
    )
    if mask.sliding_window is None:
        return splash(q, k, v)
    return jax.lax.cond(positions_follow_index(mask), splash, flash, q, k, v)


@functools.cache
def _fallback(kernel: str, reason: str) -> None:
    log.warning("attention_impl=%s: %s; using the pure-JAX flash attention", kernel, reason)
