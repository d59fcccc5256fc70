"""Algorithms whose data or reference change during the run.

* **TR-DPO** (``ref_sync``): every ``sync_steps`` steps the reference becomes
  ``a·θ + (1 − a)·θ_ref`` (``mixup_alpha`` a; 1 = hard copy). The moving reference lives in
  the train state (``aux["reference"]``) so it is checkpointed and resumed exactly.
* **DICE / SPIN** (``rounds``): ``num_rounds`` rounds of ``steps_per_round`` steps. At the
  start of round t the policy π_{t−1} is frozen as the prior (``aux["reference"]``) and the
  round's pairs are built by sampling from it (`mipo_jax.models.sampling.generate`):
  - SPIN: chosen = the dataset's chosen response, rejected = a sample from π_{t−1};
  - DICE: ``samples_per_prompt`` samples per prompt scored by the length-regularised implicit
    reward log π_{t−1} − log π_{t−2} − α_L·len (`mipo_jax.priors.dice`; lengths in tokens,
    α_L searched when ``length_alpha < 0``), best vs worst; ``mix_gamma`` of the pairs are
    replayed offline pairs.
  A round's pairs are written to ``<workdir>/rounds/round_<t>.npz`` so a resume mid-round
  trains on the same pairs.
* **Learnable prior** (``prior_model``): each step adds policy samples (``samples``) for the
  mutual-information term (padded layout: prompts are read from the batch's rows).
"""

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mipo_jax.data.encoding import Tokenized
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.packing import Layout
from mipo_jax.data.ragged import Ragged
from mipo_jax.models.sampling import generate
from mipo_jax.priors import dice
from mipo_jax.train import layout
from mipo_jax.train.step import StepSpec, sequence_logps

log = logging.getLogger("mipo_jax.train")


def total_steps(config) -> int:
    if "rounds" in config:
        return int(config.rounds.num_rounds) * int(config.rounds.steps_per_round)
    return int(config.train.num_steps)


def initial_aux(config, reference, policy):
    """(aux, aux shardings) of the state: the moving reference of TR-DPO, DICE and SPIN."""
    if ("ref_sync" in config or "rounds" in config) and reference is not None:
        return {"reference": reference}, {"reference": policy.shardings}
    return {}, {}


# ---- per step ------------------------------------------------------------------------


def next_batch(run, step: int) -> dict:
    cfg = run.config
    if "rounds" in cfg:
        if run.round != _round(cfg, step):
            start_round(run, _round(cfg, step), fresh=step % int(cfg.rounds.steps_per_round) == 0)
        batch = next(run.round_data)
    else:
        batch = next(run.train_data)
    return prepare(run, batch, step)


def prepare(run, batch: dict, step: int) -> dict:
    """Per-batch inputs computed on the host: policy samples (MI term), TIS-DPO weights."""
    if "prior_model" in run.config and run.config.loss.mi_weight:
        batch = add_policy_samples(run, batch, step)
    if run.weighter is not None:
        batch = run.weighter(batch)
    return batch


def after_step(run, step: int) -> None:
    """TR-DPO's reference update after ``step`` optimiser steps."""
    cfg = run.config
    if "ref_sync" not in cfg or step % int(cfg.ref_sync.sync_steps):
        return
    a = float(cfg.ref_sync.mixup_alpha)
    mix = _mix_fn(run, a)
    aux = dict(run.state.aux)
    aux["reference"] = mix(run.state.params["policy"], aux["reference"])
    run.state = run.state.replace(aux=aux)


def _mix_fn(run, a):
    if getattr(run, "_mix", None) is None:
        sh = run.policy.shardings
        run._mix = jax.jit(
            lambda p, r: jax.tree.map(lambda x, y: a * x + (1.0 - a) * y, p, r), out_shardings=sh
        )
    return run._mix


def data_state(run) -> dict:
    if "rounds" in run.config and getattr(run, "round_data", None) is not None:
        s = run.round_data.get_state()
        return {"round": run.round, "epoch": s["epoch"], "step": s["step"]}
    return run.train_data.get_state()


def restore_data(run, state: dict) -> None:
    if "rounds" in run.config and state and "round" in state:
        start_round(run, int(state["round"]), fresh=False)
        run.round_data.set_state({"epoch": state["epoch"], "step": state["step"]})
    elif state:
        run.train_data.set_state(state)


def _round(cfg, step: int) -> int:
    return step // int(cfg.rounds.steps_per_round)


# ---- rounds --------------------------------------------------------------------------


class _RoundData:
    def __init__(self, data: Tokenized, batch_size: int, seed: int):
        self.it = PreferenceIterator(
            data, Layout(kind="padded", batch_size=batch_size), seed=seed,
            process_index=0, process_count=1,
        )  # fmt: skip

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


def start_round(run, r: int, *, fresh: bool) -> None:
    """Build (or reload) round ``r``'s pairs; on a fresh start freeze the policy as prior."""
    cfg = run.config
    path = os.path.join(run.workdir, "rounds", f"round_{r}.npz")
    if os.path.exists(path):
        data = _load(path, run.train_data.data.pad_id)
    else:
        prior_old = run.state.aux["reference"]
        prior_new = run.state.params["policy"]
        data = build_round(run, r, prior_new, prior_old)
        if jax.process_index() == 0:
            _save(path, data)
    if fresh:
        aux = dict(run.state.aux)
        aux["reference"] = jax.tree.map(jnp.copy, run.state.params["policy"])
        run.state = run.state.replace(aux=aux)
    per_process = int(cfg.batch_size) // jax.process_count()
    run.round_data = _RoundData(data, per_process, cfg.seed + r)
    run.round = r
    log.info("round %d: %d pairs", r, len(data))


def _prompts(run, r: int, n: int):
    d = run.train_data.data
    idx = (np.arange(n) + r * n) % len(d)
    return idx, [d.prompt[int(i)].tolist() for i in idx]


def _sample(run, params, prompts, k: int, seed: int) -> list[list[int]]:
    """``k`` samples per prompt (temperature 1), each cut after its first EOS."""
    model = nnx.merge(run.policy.graph, params)
    width = run.train_data.width
    eos = run.policy.config.eos_ids
    pad = run.train_data.data.pad_id
    rep = [p for p in prompts for _ in range(k)]
    out = generate(
        model, rep, max_new_tokens=width, temperature=1.0, eos_ids=eos, pad_id=pad, seed=seed
    )
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[i, : max(int(lengths[i]), 1)].tolist() for i in range(len(rep))]


def _seq_logps(run, params, prompts, completions) -> np.ndarray:
    data = _tokenized(prompts, [completions], run.train_data.data.pad_id)
    spec = StepSpec(
        graphs=(("policy", run.policy.graph),), ref_graph=None, loss=None, tx=None, lr=None
    )
    fn = jax.jit(functools.partial(sequence_logps, spec=spec))
    width = max(len(c) for c in completions)
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    out, bs = [], 64
    for lo in range(0, len(data), bs):
        idx = np.arange(lo, min(lo + bs, len(data)))
        b = layout.pad_groups(
            layout.padded_examples(data, idx, max_length=_up(length), max_completion=_up(width)), bs
        )
        out.append(np.asarray(fn(params, b))[: len(idx), 0])
    return np.concatenate(out)


def _up(n: int, m: int = 8) -> int:
    return -(-n // m) * m


def build_round(run, r: int, prior_new, prior_old) -> Tokenized:
    cfg = run.config
    n = int(cfg.batch_size) * int(cfg.rounds.steps_per_round)
    idx, prompts = _prompts(run, r, n)
    d = run.train_data.data
    seed = cfg.seed * 1000 + r
    if cfg.rounds.get("rejected_from", "") == "policy":  # SPIN
        chosen = [d.completions[0][int(i)].tolist() for i in idx]
        rejected = _sample(run, prior_new, prompts, 1, seed)
        keep = [j for j in range(n) if chosen[j] != rejected[j]]
    else:  # DICE
        k = int(cfg.rounds.samples_per_prompt)
        samples = _sample(run, prior_new, prompts, k, seed)
        rep = [p for p in prompts for _ in range(k)]
        implicit = _seq_logps(run, prior_new, rep, samples) - _seq_logps(
            run, prior_old, rep, samples
        )
        implicit, lengths = (
            implicit.reshape(n, k),
            np.array([len(s) for s in samples]).reshape(n, k),
        )
        alpha = float(cfg.rounds.length_alpha)
        if alpha < 0:
            alpha, gap = dice.search_length_alpha(implicit, lengths)
            log.info("round %d: DICE length_alpha %.3f (length gap %.2f)", r, alpha, gap)
        best, worst = dice.select_pairs(dice.dice_scores(implicit, 0.0, lengths, alpha))
        chosen = [samples[j * k + int(best[j])] for j in range(n)]
        rejected = [samples[j * k + int(worst[j])] for j in range(n)]
        keep = [j for j in range(n) if chosen[j] != rejected[j]]
        replay = int(round(float(cfg.rounds.mix_gamma) * len(keep)))
        for j in keep[:replay]:
            chosen[j] = d.completions[0][int(idx[j])].tolist()
            rejected[j] = d.completions[1][int(idx[j])].tolist()
    missing = [j for j in range(n) if j not in set(keep)]
    want = max(n // 2, int(cfg.batch_size))
    if len(keep) < want:  # samples collapsed (a peaked model): replay offline pairs instead
        log.warning("round %d: %d of %d sampled pairs are distinct; filling with dataset pairs",
                    r, len(keep), n)  # fmt: skip
        for j in missing[: want - len(keep)]:
            chosen[j] = d.completions[0][int(idx[j])].tolist()
            rejected[j] = d.completions[1][int(idx[j])].tolist()
            keep.append(j)
    keep = sorted(keep)
    pick = lambda xs: [xs[j] for j in keep]
    return _tokenized(pick(prompts), [pick(chosen), pick(rejected)], d.pad_id)


def _tokenized(prompts, completions, pad_id) -> Tokenized:
    from mipo_jax.data.report import Report

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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"prompt_values": data.prompt.values, "prompt_offsets": data.prompt.offsets}
    for k, c in enumerate(data.completions):
        arrays[f"c{k}_values"], arrays[f"c{k}_offsets"] = c.values, c.offsets
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: str, pad_id: int) -> Tokenized:
    z = np.load(path)
    ragged = lambda p: Ragged(z[f"{p}_values"], z[f"{p}_offsets"])
    comps = tuple(ragged(f"c{k}") for k in range(2))
    t = _tokenized([[0]], [[[0]], [[0]]], pad_id)
    return dataclasses.replace(
        t,
        prompt=ragged("prompt"),
        completions=comps,
        example_id=np.arange(len(z["prompt_offsets"]) - 1),
    )


# ---- learnable prior: policy samples for the MI term ---------------------------------


def add_policy_samples(run, batch: dict, step: int) -> dict:
    """``samples``/``samples_mask`` ``[G, n, C]``: n samples per group from the current policy."""
    tokens, pred = np.asarray(batch["tokens"]), np.asarray(batch["pred_index"])
    g, _, t = tokens.shape
    n = max(1, int(run.config.prior_model.samples_per_step) // g)
    prompts = []
    for i in range(g):
        last = int(pred[i, 0, 0, 0])  # the first chosen token's predictor: the prompt's end
        prompts.append(tokens[i].reshape(-1)[: last % t + 1].tolist())
    samples = _sample(run, run.state.params["policy"], prompts, n, run.config.seed * 7919 + step)
    c = batch["targets"].shape[-1]
    out = np.zeros((g, n, c), np.int32)
    mask = np.zeros((g, n, c), np.float32)
    for j, s in enumerate(samples):
        s = s[:c]
        out[j // n, j % n, : len(s)] = s
        mask[j // n, j % n, : len(s)] = 1.0
    return {**batch, "samples": out, "samples_mask": mask}
