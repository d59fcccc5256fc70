"""Reference log-probs computed once and kept on disk, keyed by what determines them.

The key is a SHA-256 over (a) the reference weights' bytes and the model config, (b) the
tokenised dataset itself (prompt and completion ids, example ids: this covers the data, its
version and every tokenisation or truncation setting) and (c) the completion width. Any change
to the weights, the data or the tokenisation gives a new key, so a stale cache is never read.

Layout: ``<cache_dir>/<key>/ref_logps.npy`` (float32 ``[N, S, C]`` per-token log-probs of
every example of the split, in its order) plus ``meta.json``. A later run with the same key
reads the file instead of running the reference. Per-token values serve every prior
(sequence-level ones sum them); the per-token KL of TDPO/SparsePO needs the full reference
distribution and therefore a live reference.

Multi-process runs: every process holds the whole tokenised split and its blocks of the
global batches hold arbitrary examples, so every process keeps the values of every example.
The key, and hence the file, is the same for any process count. On a miss (on any process:
they agree first, so that all of them run the same collectives) the processes score the
split together on the global mesh, batch by batch, each batch the same on every process and
its result gathered to all; each process then writes the same file (atomically, under a
name of its own first), which is harmless when the cache directory is shared.
"""

import hashlib
import json
import os
import time

import jax
import numpy as np

from mipo_jax import paths
from mipo_jax.distributed import all_agree
from mipo_jax.train import step_batch
from mipo_jax.train.data import fetch


def weights_hash(params, extra: str = "") -> str:
    """Content hash of a parameter pytree (values, shapes, dtypes, tree paths)."""
    h = hashlib.sha256(extra.encode())
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = fetch(x)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """Hash of a tokenised split: every prompt and completion id, and the example ids."""
    h = hashlib.sha256()
    for r in (data.prompt, *data.completions):
        h.update(np.ascontiguousarray(r.values).tobytes())
        h.update(np.ascontiguousarray(r.offsets).tobytes())
    h.update(np.ascontiguousarray(data.example_id).tobytes())
    return h.hexdigest()


def cache_key(weights: str, data: str, width: int) -> str:
    return hashlib.sha256(f"{weights}|{data}|C={width}".encode()).hexdigest()[:24]


class ReferenceCache:
    """Per-token reference log-probs of every example of a tokenised split.

    Args:
      directory: cache root (``config.reference.cache_dir``).
      weights: ``weights_hash`` of the reference (with its model config).
      data: the tokenised split (``mipo_jax.data.Tokenized``), the same on every process.
      width: completion width C of the batches it will serve.
    """

    def __init__(self, directory: str, weights: str, data, width: int):
        self.data, self.width = data, int(width)
        self.key = cache_key(weights, data_fingerprint(data), self.width)
        self.dir = paths.join(directory, self.key)
        self.path = paths.join(self.dir, "ref_logps.npy")
        self.values: np.ndarray | None = None
        self.hit = False
        self._row = {int(e): i for i, e in enumerate(data.example_id)}

    def load_or_build(self, score, *, batch_size: int = 64, max_length: int) -> "ReferenceCache":
        """Read the cache file, or compute it with ``score(batch) -> [G·P, S, C]`` and write it.

        ``score`` runs the reference on a padded batch (``step_batch.padded_examples``) of the
        whole split's examples, the same batch on every process, and returns numpy values.
        """
        if all_agree(paths.exists(self.path)):
            self.values = paths.load_npy(self.path, mmap_mode="r")
            self.hit = True
            return self
        n = len(self.data)
        out = np.zeros((n, self.data.num_completions, self.width), np.float32)
        start = time.time()
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(lo + batch_size, n))
            batch = step_batch.padded_examples(
                self.data, idx, max_length=max_length, max_completion=self.width
            )
            batch = step_batch.pad_groups(batch, batch_size)
            out[idx] = np.asarray(score(batch))[: len(idx)] * batch["mask"][: len(idx), 0]
        paths.makedirs(self.dir)
        tmp = f".tmp.p{jax.process_index()}.{os.getpid()}"
        tmp_npy = self.path + tmp + ".npy"
        paths.write_with(self.path, lambda f: np.save(f, out), tmp_path=tmp_npy)
        meta = dict(key=self.key, examples=n, width=self.width, seconds=time.time() - start)
        paths.write_text(paths.join(self.dir, "meta.json"), json.dumps(meta), tmp=tmp)
        self.values, self.hit = out, False
        return self

    def attach(self, batch: dict) -> dict:
        """Add ``ref_logps`` ``[G, P, S, C]`` for the batch's examples (0 in empty slots)."""
        ids = np.asarray(batch["example_id"])
        rows = np.array([self._row.get(int(e), -1) for e in ids.ravel()]).reshape(ids.shape)
        c = batch["targets"].shape[-1]
        vals = np.asarray(self.values)[np.maximum(rows, 0)][..., :c]
        if vals.shape[-1] < c:
            vals = np.pad(vals, [(0, 0)] * (vals.ndim - 1) + [(0, c - vals.shape[-1])])
        vals = np.where((rows >= 0)[..., None, None], vals, 0.0).astype(np.float32)
        return {**batch, "ref_logps": vals}
