"""Attention masks from segment ids, row indices and positions (padding, packing, shared prompts).

Convention (every model in `mipo_jax.models` uses it):

* ``segment_ids [B, T]`` (int): 0 marks padding; tokens with the same positive id form one
  sequence. A row may pack several sequences (ids 1, 2, 3, ...). ``None`` means one
  sequence per row and no padding.
* ``positions [B, T]`` (int): each token's position inside its own sequence; it drives RoPE
  (or GPT-2's position table) and the sliding window, never causality. ``None`` means
  ``arange(T)`` in every row. For packed rows restart it at 0 for every segment; for left
  padding use ``cumsum(segment_ids > 0) - 1``, as transformers does when it generates.
* ``attend_to [B, T]`` (int, optional): one extra segment each query token may read.
  A token with ``attend_to = s > 0`` also sees every token of segment ``s`` that comes
  before it in the row. 0 means nothing extra.

Query ``q`` sees key ``k`` (same row) iff
``k <= q`` (row order)  and  ``seg[q] > 0``  and  ``seg[k] > 0``  and
``(seg[k] == seg[q]  or  seg[k] == attend_to[q])``  and, with a sliding window ``W``,
``pos[q] - pos[k] < W``.

Shared prompt: pack one prompt and its two completions in a row, e.g. segments
``[1 1 1 | 2 2 | 3 3 3 | 0 0]`` (prompt, chosen, rejected, padding), with positions
``[0 1 2 | 3 4 | 3 4 5 | 0 0]`` and ``attend_to = [0 0 0 | 1 1 | 1 1 1 | 0 0]``. Each
completion then sees the prompt and itself, never the other completion, and its logits equal
those of ``prompt + completion`` run alone.

Padding queries see nothing; their softmax is uniform over masked scores (finite, ignored).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
    *,
    q_attend_to: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean ``[B, T, S]``: may query t read key s. Arguments are ``[B, T]`` or ``[B, S]``.

    `q_index`/`kv_index` are the tokens' places in the row (or in the KV cache), which
    define causality; positions are only needed with a sliding window.
    """
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same = kv_segment_ids[:, None, :] == q_segment_ids[:, :, None]
    if q_attend_to is not None:
        same = same | (kv_segment_ids[:, None, :] == q_attend_to[:, :, None])
    valid = (q_segment_ids > 0)[:, :, None] & (kv_segment_ids > 0)[:, None, :]
    mask = causal & same & valid
    if sliding_window is not None:
        mask = mask & (q_positions[:, :, None] - kv_positions[:, None, :] < sliding_window)
    return mask


def self_attention_mask(
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    attend_to: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """`attention_mask` of a full sequence (training / scoring) with itself."""
    batch, length = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return attention_mask(
        segment_ids,
        segment_ids,
        index,
        index,
        q_attend_to=attend_to,
        q_positions=positions,
        kv_positions=positions,
        sliding_window=sliding_window,
    )


@struct.dataclass
class SegmentMask:
    """`self_attention_mask` of a full sequence, not materialised: the ids it is made from.

    Attention implementations that never hold a ``[T, T]`` array (`models.flash`, cuDNN,
    splash) compute the blocks they need from these. ``positions`` is only read with a
    sliding window (None otherwise).
    """

    segment_ids: jax.Array  # [B, T]
    positions: jax.Array | None  # [B, T]
    attend_to: jax.Array | None  # [B, T]
    sliding_window: int | None = struct.field(pytree_node=False, default=None)

    def dense(self) -> jax.Array:
        """The boolean ``[B, T, T]`` mask (tests, small inputs)."""
        return self_attention_mask(
            self.segment_ids,
            self.positions,
            attend_to=self.attend_to,
            sliding_window=self.sliding_window,
        )


def segment_mask(segment_ids, positions, *, attend_to=None, sliding_window=None) -> SegmentMask:
    """The `SegmentMask` whose `dense` form is `self_attention_mask` of the same arguments."""
    return SegmentMask(
        segment_ids, positions if sliding_window is not None else None, attend_to, sliding_window
    )


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at every segment change (0 on padding)."""
    batch, length = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(segment_ids > 0, index - start_index, 0)


def attention_span(segment_ids, attend_to=None) -> int:
    """Host-side: the largest ``t - s + 1`` over query t and visible key s of the batch.

    ``segment_ids``/``attend_to`` are ``[..., T]`` arrays (numpy). A query sees keys of its own
    segment and of its ``attend_to`` segment; the earliest of them is each segment's first
    token in the row. ``CausalLM.hidden(..., span=)`` may skip keys further back than this.
    Padding and segments never attended to contribute nothing; returns 0 for an empty batch.
    """
    seg = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1]).astype(np.int64)
    att = seg if attend_to is None else np.asarray(attend_to).reshape(seg.shape).astype(np.int64)
    rows, t = seg.shape
    if seg.size == 0 or not (seg > 0).any():
        return 0
    ids = int(max(seg.max(), att.max())) + 1
    index = np.broadcast_to(np.arange(t), seg.shape)
    offset = (np.arange(rows) * ids)[:, None]
    first = np.full(rows * ids, t, np.int64)  # each (row, segment)'s first index; t = none
    np.minimum.at(first, (seg + offset).ravel(), index.ravel())
    start = first[seg + offset]
    start = np.where(att > 0, np.minimum(start, first[att + offset]), start)
    live = seg > 0
    return int((index - start)[live].max()) + 1
