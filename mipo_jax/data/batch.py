"""The batch the data pipeline yields: a dict of arrays in the train step's group layout.

This is the layout `mipo_jax.train.step_batch` defines and `mipo_jax.train.step` reads; the
attention rule is `mipo_jax.models.masks`. Shape letters: G groups (the leading axis, sharded
over the data axes and split into micro-batches), K rows per group, T tokens per row,
P example slots per group, S sides (2: index 0 chosen, 1 rejected; 1 for unpaired data),
C completion width. Every index stays inside its group, so a group is self-contained.

Row view (what the model reads), ``[G, K, T]`` int32:
  ``tokens``       token ids (``pad_id`` in padding);
  ``segment_ids``  0 = padding, 1, 2, ... = the sequences packed in a row;
  ``positions``    each token's position in its own unpacked ``prompt + completion``;
  ``attend_to``    (shared-prompt layout only) the prompt segment a completion token also
                   reads; 0 elsewhere. Query q sees key k iff k <= q in the row, both are in
                   segments > 0, and ``seg[k] == seg[q]`` or ``seg[k] == attend_to[q]``.

Slot view (what the loss reads), ``[G, P, S, C]``, completion-aligned:
  ``pred_index``   int32: flat index into the group's ``K*T`` positions of the hidden state
                   that predicts completion token c (the token before it in its sequence);
  ``targets``      int32: completion token c;
  ``mask``         float32: 1.0 on the completion's tokens (EOS included), 0.0 after.
  ``targets``/``mask`` over ``[G*P, S, C]`` are the ``[B, 2, T]`` arrays of
  ``mipo_jax.types.TokenInputs`` (B = G*P, T = C).

Per slot: ``pair_valid`` [G, P] float32 (0.0 for empty slots, whose masks are all zero: the
loss weights by it), ``example_id`` [G, P] int32 (source row, -1 for empty slots),
``ref_logps`` [G, P, S] float32 (summed reference log-probs from the dataset, if given),
``label`` [G, P] float32 (unpaired data: 1.0 desirable, 0.0 undesirable).

Unpaired data in the padded layout also carries ``kl_tokens``, ``kl_segment_ids``,
``kl_positions``, ``kl_pred_index``, ``kl_targets``, ``kl_mask``: each prompt with the next
slot's completion (cyclically within the global batch), TRL's mismatched pairs for KTO's KL term.

Layouts:
  ``padded``         a group is one example: K = S rows (``prompt + completion_s``, right
                     padded), P = 1. ``tokens`` is then the classic pair axis ``[B, 2, T]``.
  ``pairs``          a group is ``rows`` rows of ``row_length`` tokens holding up to
                     ``max_pairs`` examples, one segment per sequence (pair packing).
  ``shared_prompt``  as ``pairs``, but an example is ``prompt | chosen | rejected`` in one
                     row: the prompt once (its own segment), then each completion as a segment
                     that attends to the prompt's, positions restarting after the prompt, so
                     each completion's log-probs equal the unpacked ones.
Every valid slot has at least one mask token on every side.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("padded", "pairs", "shared_prompt")


def attention_mask(batch: dict, prefix: str = ""):
    """Boolean ``[G*K, T, T]`` mask of a batch's rows (`mipo_jax.models.masks`)."""
    from mipo_jax.models.masks import self_attention_mask

    def rows(key):
        x = batch.get(prefix + key)
        return None if x is None else x.reshape(-1, x.shape[-1])

    return self_attention_mask(rows("segment_ids"), rows("positions"), attend_to=rows("attend_to"))


def gather_slots(per_position, pred_index):
    """``[G, K, T, ...]`` values -> ``[G, P, S, C, ...]`` at each completion token's predictor."""
    g, k, t = per_position.shape[:3]
    flat = per_position.reshape((g, k * t) + per_position.shape[3:])
    rows = np.arange(g).reshape((g,) + (1,) * (pred_index.ndim - 1))
    return flat[rows, pred_index]


def num_tokens(batch: dict) -> int:
    """Non-padding tokens in the row view."""
    return int((np.asarray(batch["segment_ids"]) > 0).sum())
