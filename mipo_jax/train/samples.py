"""Sampling from the policy during training, on the host side of the step.

* `sample_completions`: ``k`` completions per prompt from a model's current weights
  (temperature 1, each cut after its first EOS), with the jitted KV-cache sampler
  (`mipo_jax.models.sampling.generate`). DICE/SPIN's rounds build their pairs with it.
* `PolicySamples`: the learnable prior's mutual-information term reads responses sampled
  from the current policy; this batch transform adds ``samples``/``samples_mask``
  ``[G, n, C]`` (n per group; the prompts are read from the batch's padded rows).
"""

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from mipo_jax.models.sampling import generate


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What sampling needs besides weights and prompts: the model graph and token ids."""

    graph: Any
    max_new_tokens: int
    eos_ids: tuple
    pad_id: int


def sample_completions(sampler: Sampler, params, prompts, k: int, seed: int) -> list[list[int]]:
    """``k`` samples per prompt (temperature 1), each cut after its first EOS."""
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
    )
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[i, : max(int(lengths[i]), 1)].tolist() for i in range(len(rep))]


class PolicySamples:
    """Batch transform: ``samples_per_step`` policy samples per step for the MI term."""

    def __init__(self, sampler: Sampler, samples_per_step: int, seed: int):
        self.sampler, self.per_step, self.seed = sampler, int(samples_per_step), int(seed)

    def __call__(self, batch: dict, state, step: int) -> dict:
        tokens, pred = np.asarray(batch["tokens"]), np.asarray(batch["pred_index"])
        g, _, t = tokens.shape
        n = max(1, self.per_step // g)
        prompts = []
        for i in range(g):
            last = int(pred[i, 0, 0, 0])  # the first chosen token's predictor: the prompt's end
            prompts.append(tokens[i].reshape(-1)[: last % t + 1].tolist())
        params = state.params["policy"]
        samples = sample_completions(self.sampler, params, prompts, n, self.seed * 7919 + step)
        c = batch["targets"].shape[-1]
        out = np.zeros((g, n, c), np.int32)
        mask = np.zeros((g, n, c), np.float32)
        for j, s in enumerate(samples):
            s = s[:c]
            out[j // n, j % n, : len(s)] = s
            mask[j // n, j % n, : len(s)] = 1.0
        return {**batch, "samples": out, "samples_mask": mask}
