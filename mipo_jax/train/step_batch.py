"""The batch layout the train step reads, and converters into it.

A step batch is a dict of arrays whose leading axis is G *groups*: the axis that is sharded
over ('data', 'fsdp') and split into micro-batches. A group is self-contained: K rows of T
tokens holding P pairs, and every index stays inside its group.

  tokens, segment_ids, positions [G, K, T] int32   attend_to [G, K, T] int32 (optional)
  pred_index, targets            [G, P, 2, C] int32
  mask                           [G, P, 2, C] float32
  pair_valid                     [G, P] float32    1 for real pairs, 0 for padding slots
  ref_logps                      [G, P, 2, C] float32 (optional: cached reference)
  token_weights                  [G, P, 2, C] float32 (optional: TIS-DPO)

Completion token c of side s (0 chosen, 1 rejected) of pair p is ``targets[g, p, s, c]``,
predicted by the hidden state at flat position ``pred_index[g, p, s, c]`` of the group's
``K·T`` tokens (the token before it *in its own sequence*). So padded, packed and
shared-prompt rows look the same to the step, and only completion slots reach the
unembedding: the vocabulary projection never runs on prompt or padding tokens.

Attention follows `mipo_jax.models.masks`: same positive segment id, row order, plus
``attend_to`` (a completion in a shared-prompt row also reads its prompt's segment).

* padded pair axis: a group is one pair, K = 2 rows (prompt + chosen, prompt + rejected).
* packed layouts: a group is one packed batch of the data pipeline (K rows, P pair slots).
"""

import numpy as np

ROW_KEYS = ("tokens", "segment_ids", "positions", "attend_to")
SLOT_KEYS = ("pred_index", "targets", "mask", "ref_logps", "token_weights")


def padded_pairs(prompts, chosen, rejected, *, max_length: int, max_completion: int, pad_id=0):
    """A padded pair-axis step batch (G = B pairs, K = 2, P = 1) from token-id lists."""
    b, t, c = len(prompts), max_length, max_completion
    out = {
        "tokens": np.full((b, 2, t), pad_id, np.int32),
        "segment_ids": np.zeros((b, 2, t), np.int32),
        "positions": np.zeros((b, 2, t), np.int32),
        "pred_index": np.zeros((b, 1, 2, c), np.int32),
        "targets": np.zeros((b, 1, 2, c), np.int32),
        "mask": np.zeros((b, 1, 2, c), np.float32),
        "pair_valid": np.ones((b, 1), np.float32),
    }
    for i, (p, *ys) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        for k, y in enumerate(ys):
            seq = list(p) + list(y)
            n, m = len(seq), len(y)
            if n > t or m > c or not p:
                raise ValueError(
                    f"pair {i}: prompt {len(p)} + completion {m} tokens exceed T={t} or C={c} "
                    "(or the prompt is empty)"
                )
            out["tokens"][i, k, :n] = seq
            out["segment_ids"][i, k, :n] = 1
            out["positions"][i, k, :n] = np.arange(n)
            out["pred_index"][i, 0, k, :m] = k * t + np.arange(len(p) - 1, n - 1)
            out["targets"][i, 0, k, :m] = y
            out["mask"][i, 0, k, :m] = 1.0
    return out


def split_groups(batch, n: int):
    """``[G, ...] -> [n, G/n, ...]``; micro-batch i takes groups i, i+n, i+2n, ...

    Strided, so each micro-batch keeps its groups spread over every device of the batch
    axes rather than living on one block of them.
    """

    def cut(x):
        g = x.shape[0]
        if g % n:
            raise ValueError(f"{g} groups do not split into {n} micro-batches")
        return x.reshape(g // n, n, *x.shape[1:]).swapaxes(0, 1)

    return {k: cut(v) for k, v in batch.items()}


def padded_examples(data, index, *, max_length: int, max_completion: int):
    """Padded step batch (one group per example, K = S rows) of ``data`` examples ``index``.

    ``data`` is a ``mipo_jax.data.Tokenized`` shard with S completions per example; used to
    score a whole dataset in a fixed order (reference caches, exact task evaluation).
    """
    index = np.asarray(index)
    s = data.num_completions
    g, t, c = len(index), max_length, max_completion
    out = {
        "tokens": np.full((g, s, t), data.pad_id, np.int32),
        "segment_ids": np.zeros((g, s, t), np.int32),
        "positions": np.zeros((g, s, t), np.int32),
        "pred_index": np.zeros((g, 1, s, c), np.int32),
        "targets": np.zeros((g, 1, s, c), np.int32),
        "mask": np.zeros((g, 1, s, c), np.float32),
        "pair_valid": np.ones((g, 1), np.float32),
    }
    for j, i in enumerate(index):
        p = data.prompt[int(i)]
        for k in range(s):
            y = data.completions[k][int(i)]
            n, m = len(p) + len(y), len(y)
            if n > t or m > c:
                raise ValueError(f"example {i}: {n} tokens > T={t} or completion {m} > C={c}")
            out["tokens"][j, k, : len(p)] = p
            out["tokens"][j, k, len(p) : n] = y
            out["segment_ids"][j, k, :n] = 1
            out["positions"][j, k, :n] = np.arange(n)
            out["pred_index"][j, 0, k, :m] = k * t + np.arange(len(p) - 1, n - 1)
            out["targets"][j, 0, k, :m] = y
            out["mask"][j, 0, k, :m] = 1.0
    return out


def pad_groups(batch, multiple: int):
    """Append empty groups (``pair_valid`` 0, no tokens) so G is a multiple of ``multiple``."""
    g = batch["tokens"].shape[0]
    extra = -g % multiple
    if not extra:
        return batch
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }
