"""Sampling from the policy during training, on the mesh of the step.

* `sample_completions`: ``k`` completions per prompt from a model's current weights
  (temperature 1, each cut after its first EOS), with the jitted KV-cache sampler
  (`mipo_jax.models.sampling.generate`). DICE/SPIN's rounds build their pairs with it.
* `PolicySamples`: the learnable prior's mutual-information term reads responses sampled
  from the current policy; this batch transform adds ``samples``/``samples_mask``
  ``[G, n, C]`` (n per group; the prompts are read from the batch's padded rows).

Sampling runs where the step runs: the rows are split over the mesh's batch axes (the
parameters stay in their training sharding), every process passes the same, whole list of
prompts and gets every sample back. The samples are a function of the global prompts, the
weights and the seed, so a run with 1 or N processes samples the same tokens.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mipo_jax.models.sampling import generate


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What sampling needs besides weights and prompts: the model graph, token ids and the
    batch sharding of the step (None: wherever the weights and jit put it, one process)."""

    graph: Any
    max_new_tokens: int
    eos_ids: tuple
    pad_id: int
    sharding: NamedSharding | None = None


def sample_completions(sampler: Sampler, params, prompts, k: int, seed: int) -> list[list[int]]:
    """``k`` samples per prompt (temperature 1), each cut after its first EOS.

    ``prompts``: the whole (global) list, the same on every process; so is the result.
    """
    model = nnx.merge(sampler.graph, params)
    rep = [p for p in prompts for _ in range(k)]
    out = generate(
        model,
        rep,
        max_new_tokens=sampler.max_new_tokens,
        temperature=1.0,
        eos_ids=sampler.eos_ids,
        pad_id=sampler.pad_id,
        seed=seed,
        sharding=sampler.sharding,
    )
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[i, : max(int(lengths[i]), 1)].tolist() for i in range(len(rep))]


def global_rows(x: np.ndarray) -> np.ndarray:
    """This process's block of a batch field -> the global batch's (blocks in process order,
    as `mipo_jax.data.iterator.to_global` lays them out); the same array in one process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class PolicySamples:
    """Batch transform: ``samples_per_step`` policy samples per step for the MI term.

    The samples are drawn for the global batch's prompts (n = ``samples_per_step`` // G per
    group, G the global groups) and each process keeps its block's.
    """

    def __init__(self, sampler: Sampler, samples_per_step: int, seed: int):
        self.sampler, self.per_step, self.seed = sampler, int(samples_per_step), int(seed)

    def __call__(self, batch: dict, state, step: int) -> dict:
        local = batch["tokens"].shape[0]
        tokens = global_rows(np.asarray(batch["tokens"]))
        pred = global_rows(np.asarray(batch["pred_index"]))
        g, _, t = tokens.shape
        n = max(1, self.per_step // g)
        prompts = []
        for i in range(g):
            last = int(pred[i, 0, 0, 0])  # the first chosen token's predictor: the prompt's end
            prompts.append(tokens[i].reshape(-1)[: last % t + 1].tolist())
        params = state.params["policy"]
        samples = sample_completions(self.sampler, params, prompts, n, self.seed * 7919 + step)
        first = jax.process_index() * local  # this process's block of the global batch
        c = batch["targets"].shape[-1]
        out = np.zeros((local, n, c), np.int32)
        mask = np.zeros((local, n, c), np.float32)
        for j, s in enumerate(samples[first * n : (first + local) * n]):
            s = s[:c]
            out[j // n, j % n, : len(s)] = s
            mask[j // n, j % n, : len(s)] = 1.0
        return {**batch, "samples": out, "samples_mask": mask}
