"""DICE / SPIN rounds: a batch source whose pairs are sampled from the policy itself.

``num_rounds`` rounds of ``steps_per_round`` steps. Round t trains MI-DPO with the prior
ζ = π_{t−1}, the policy at the round's start (the step freezes it into the state's
``aux["reference"]`` at the round's first step: `mipo_jax.train.step`), on pairs built at
the round's start by sampling from π_{t−1} (`mipo_jax.train.samples`):

- SPIN: chosen = the dataset's chosen response, rejected = a sample from π_{t−1};
- DICE: ``samples_per_prompt`` samples per prompt scored by the length-regularised implicit
  reward log π_{t−1} − log π_{t−2} − α_L·len (`mipo_jax.train.dice_pairs`; lengths in
  tokens, α_L searched when ``length_alpha < 0``), best vs worst; ``mix_gamma`` of the pairs
  are replayed offline pairs.

A round's pairs are written to ``<workdir>/rounds/round_<t>.npz`` and the source's state
(round, epoch, step) is checkpointed, so a resume mid-round trains on the same pairs.
All rounds share one optimiser state and one learning-rate schedule over
``num_rounds × steps_per_round`` steps.

Several processes: every process builds the same round. The prompts are a global list, the
sampling and DICE's scoring run on the whole mesh (`mipo_jax.train.samples`), and every
process gets every sample and score back, so all hold the same pairs (checked) and each
trains on its block of every global batch, as with the dataset. Process 0 writes the round
file; on a resume every process reads it, so the workdir must be shared, as the checkpoints
need anyway (the file holds what no checkpoint does: DICE scores with π_{t−2}).
"""

import dataclasses
import functools
import hashlib
import logging

import jax
import numpy as np

from mipo_jax import paths
from mipo_jax.data.encoding import Tokenized
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.packing import Layout
from mipo_jax.data.ragged import Ragged
from mipo_jax.data.report import Report
from mipo_jax.models.sampling import batch_shards
from mipo_jax.train import dice_pairs, step_batch
from mipo_jax.train.data import fetch, to_device
from mipo_jax.train.samples import Sampler, sample_completions
from mipo_jax.train.scoring import Scorer, sequence_logps

log = logging.getLogger("mipo_jax.train")


class _RoundData:
    """This process's block of padded batches of one round's pairs (host-only fields dropped).

    ``batch_size``: examples per process (the global batch over the process count)."""

    def __init__(self, data: Tokenized, batch_size: int, seed: int):
        self.it = PreferenceIterator(data, Layout(kind="padded", batch_size=batch_size), seed=seed)

    def __next__(self):
        b = next(self.it)
        for k in ("example_id", "ref_logps", "label"):
            b.pop(k, None)
        return b

    def get_state(self):
        s = self.it.get_state()
        return {"epoch": s["epoch"], "step": s["step"]}

    def set_state(self, s):
        self.it.set_state(s)


class RoundSource:
    """Train batches of DICE/SPIN: each round's pairs, built at the round's first batch.

    ``dataset``: the training split (`mipo_jax.train.data.StepData`), the source of prompts
    (and of SPIN's chosen responses and DICE's replayed pairs).
    """

    def __init__(self, config, workdir: str, dataset, sampler: Sampler, scorer: Scorer):
        self.config, self.workdir, self.dataset = config, workdir, dataset
        self.sampler, self.scorer = sampler, scorer
        self.steps_per_round = int(config.rounds.steps_per_round)
        self.round: int | None = None
        self.data: _RoundData | None = None
        self._resume: dict | None = None  # a checkpointed position, applied at the next batch
        self._score = jax.jit(functools.partial(sequence_logps, scorer=scorer))

    def next(self, step: int, state) -> dict:
        if self._resume is not None:
            self._start(int(self._resume["round"]), state)
            self.data.set_state({"epoch": self._resume["epoch"], "step": self._resume["step"]})
            self._resume = None
        r = step // self.steps_per_round
        if self.round != r:
            self._start(r, state)
        return next(self.data)

    def get_state(self) -> dict:
        if self._resume is not None:
            return dict(self._resume)
        if self.data is None:
            return self.dataset.get_state()
        s = self.data.get_state()
        return {"round": self.round, "epoch": s["epoch"], "step": s["step"]}

    def set_state(self, state: dict) -> None:
        if state and "round" in state:
            self._resume = dict(state)

    def _start(self, r: int, state) -> None:
        """Round ``r``'s pairs: reloaded, or built from the state's policy and prior."""
        path = paths.join(self.workdir, "rounds", f"round_{r}.npz")
        if _exists_on_process_0(path):  # all processes load, or all build (collectives)
            if not paths.exists(path):
                raise FileNotFoundError(
                    f"{path}: process 0 has this round's pairs, process {jax.process_index()} "
                    "cannot read them; every process must see the same workdir (a shared "
                    "file system, as the checkpoints need)"
                )
            data = _load(path, self.dataset.data.pad_id)
        else:
            data = self._build(r, state.params["policy"], state.aux["reference"])
            if jax.process_index() == 0:
                _save(path, data)
        _check_same_everywhere(data, path)
        per_process = int(self.config.batch_size) // jax.process_count()
        self.data = _RoundData(data, per_process, self.config.seed + r)
        self.round = r
        log.info("round %d: %d pairs", r, len(data))

    def _prompts(self, r: int, n: int):
        d = self.dataset.data
        idx = (np.arange(n) + r * n) % len(d)
        return idx, [d.prompt[int(i)].tolist() for i in idx]

    def _seq_logps(self, params, prompts, completions) -> np.ndarray:
        """Summed log-probs of each (global) prompt's completion, scored on the whole mesh:
        every process passes every row and gets every score back."""
        data = _tokenized(prompts, [completions], self.dataset.data.pad_id)
        width = max(len(c) for c in completions)
        length = max(len(p) + len(c) for p, c in zip(prompts, completions))
        sharding = self.sampler.sharding
        bs = 64 if sharding is None else _up(64, batch_shards(sharding))
        out = []
        for lo in range(0, len(data), bs):
            idx = np.arange(lo, min(lo + bs, len(data)))
            b = step_batch.padded_examples(
                data, idx, max_length=_up(length), max_completion=_up(width)
            )
            b = step_batch.pad_groups(b, bs)
            if sharding is not None:
                b = to_device(b, sharding, whole=True)
            out.append(fetch(self._score(params, b))[: len(idx), 0])
        return np.concatenate(out)

    def _build(self, r: int, prior_new, prior_old) -> Tokenized:
        cfg = self.config
        n = int(cfg.batch_size) * self.steps_per_round
        idx, prompts = self._prompts(r, n)
        d = self.dataset.data
        seed = cfg.seed * 1000 + r
        if cfg.rounds.get("rejected_from", "") == "policy":  # SPIN
            chosen = [d.completions[0][int(i)].tolist() for i in idx]
            rejected = sample_completions(self.sampler, prior_new, prompts, 1, seed)
            keep = [j for j in range(n) if chosen[j] != rejected[j]]
        else:  # DICE
            chosen, rejected, keep = self._dice_pairs(r, idx, prompts, prior_new, prior_old, seed)
        missing = [j for j in range(n) if j not in set(keep)]
        want = max(n // 2, int(cfg.batch_size))
        if len(keep) < want:  # samples collapsed (a peaked model): replay offline pairs instead
            log.warning("round %d: %d of %d sampled pairs are distinct; filling with dataset "
                        "pairs", r, len(keep), n)  # fmt: skip
            for j in missing[: want - len(keep)]:
                chosen[j] = d.completions[0][int(idx[j])].tolist()
                rejected[j] = d.completions[1][int(idx[j])].tolist()
                keep.append(j)
        keep = sorted(keep)
        pick = lambda xs: [xs[j] for j in keep]
        return _tokenized(pick(prompts), [pick(chosen), pick(rejected)], d.pad_id)

    def _dice_pairs(self, r, idx, prompts, prior_new, prior_old, seed):
        cfg, d, n = self.config, self.dataset.data, len(prompts)
        k = int(cfg.rounds.samples_per_prompt)
        samples = sample_completions(self.sampler, prior_new, prompts, k, seed)
        rep = [p for p in prompts for _ in range(k)]
        implicit = self._seq_logps(prior_new, rep, samples) - self._seq_logps(
            prior_old, rep, samples
        )
        implicit = implicit.reshape(n, k)
        lengths = np.array([len(s) for s in samples]).reshape(n, k)
        alpha = float(cfg.rounds.length_alpha)
        if alpha < 0:
            alpha, gap = dice_pairs.search_length_alpha(implicit, lengths)
            log.info("round %d: DICE length_alpha %.3f (length gap %.2f)", r, alpha, gap)
        scores = dice_pairs.dice_scores(implicit, 0.0, lengths, alpha)
        best, worst = dice_pairs.select_pairs(scores)
        chosen = [samples[j * k + int(best[j])] for j in range(n)]
        rejected = [samples[j * k + int(worst[j])] for j in range(n)]
        keep = [j for j in range(n) if chosen[j] != rejected[j]]
        replay = int(round(float(cfg.rounds.mix_gamma) * len(keep)))
        for j in keep[:replay]:
            chosen[j] = d.completions[0][int(idx[j])].tolist()
            rejected[j] = d.completions[1][int(idx[j])].tolist()
        return chosen, rejected, keep


def _up(n: int, m: int = 8) -> int:
    return -(-n // m) * m


def _exists_on_process_0(path: str) -> bool:
    """Whether process 0 sees ``path`` (every process gets its answer)."""
    here = paths.exists(path)
    if jax.process_count() == 1:
        return here
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(here)))


def _digest(data: Tokenized) -> np.ndarray:
    h = hashlib.sha256()
    for r in (data.prompt, *data.completions):
        h.update(np.ascontiguousarray(r.values).tobytes())
        h.update(np.ascontiguousarray(r.offsets).tobytes())
    return np.frombuffer(h.digest()[:16], np.uint32)


def _check_same_everywhere(data: Tokenized, path: str) -> None:
    """Refuse to train when processes hold different pairs (each trains its block of them)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = multihost_utils.process_allgather(_digest(data))
    if not (digests == digests[0]).all():
        raise RuntimeError(
            f"{path}: the processes built different round pairs (sampling or scoring is not "
            "deterministic across processes); digests per process: "
            f"{[bytes(d).hex() for d in digests]}"
        )


def _tokenized(prompts, completions, pad_id) -> Tokenized:
    return Tokenized(
        prompt=Ragged.from_lists(prompts),
        completions=tuple(Ragged.from_lists(c) for c in completions),
        example_id=np.arange(len(prompts), dtype=np.int64),
        ref_logps=None,
        label=None,
        pad_id=pad_id,
        report=Report("round", "error"),
    )


def _save(path: str, data: Tokenized) -> None:
    paths.makedirs(paths.dirname(path))
    arrays = {"prompt_values": data.prompt.values, "prompt_offsets": data.prompt.offsets}
    for k, c in enumerate(data.completions):
        arrays[f"c{k}_values"], arrays[f"c{k}_offsets"] = c.values, c.offsets
    paths.write_with(path, lambda f: np.savez(f, **arrays), tmp_path=path + ".tmp.npz")


def _load(path: str, pad_id: int) -> Tokenized:
    z = paths.load_npy(path)
    ragged = lambda p: Ragged(z[f"{p}_values"], z[f"{p}_offsets"])
    comps = tuple(ragged(f"c{k}") for k in range(2))
    t = _tokenized([[0]], [[[0]], [[0]]], pad_id)
    return dataclasses.replace(
        t,
        prompt=ragged("prompt"),
        completions=comps,
        example_id=np.arange(len(z["prompt_offsets"]) - 1),
    )
