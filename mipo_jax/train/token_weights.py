"""TIS-DPO token weights (Liu et al. ICLR 2025, arXiv 2410.04350; code exlaw/TIS-DPO).

Raw score per completion token from two contrastive models π⁺ and π⁻ (the original's
``token_weight_estimation.py``): d_t = log π⁺(y_t|·) − log π⁻(y_t|·) on chosen tokens and its
negative on rejected tokens, then a ``transform`` (config ``token_weights``):

* ``binary``: every weight 1 (the code's default, top_percent=100: the loss is DPO's; no
  contrastive model is built or run);
* ``rank_based``: ranks of d_t within the sequence mapped linearly onto [low, high]
  (ties share their mean rank, so equal scores give (low + high)/2);
* ``threshold_and_scale``: clamp d_t to [−clamp, clamp], map linearly onto [low, high].

The contrastive models (``token_weights.source``), both started from the reference:

* ``dpo``, TIS-DPO(D), the paper's best: π⁺ trained by DPO on the training pairs, π⁻ by DPO
  on the same pairs with chosen and rejected swapped. The original README runs its DPO trainer
  twice with the final run's own settings (β, learning rate, RMSprop, batch size, one epoch;
  ``reverse_dataset=true`` for π⁻) and then scores every response token with both models.
* ``sft``, TIS-DPO(S): π⁺ by SFT (token-mean NLL) on the chosen responses, π⁻ on the rejected.
* ``folders``: two HF folders ``positive`` / ``negative`` trained elsewhere.

``dpo`` and ``sft`` are ordinary runs of this trainer, stages before the main run
(`mipo_jax.train.stages`: sharded, multi-process, checkpointed and resumable), with the
main config's model, data, mesh and optimiser (`contrastive_config`: SFT is the trainer's
``sft`` objective), in ``<cache_dir>/<key>/positive|negative`` and exported there as HF
folders. The key
is a SHA-256 of the reference weights, the tokenised training data (every process's shard) and
the contrastive runs' configs, so a later run with the same key loads the two folders instead
of training them; any change to the reference, the data or a setting trains new ones. Knobs:
``steps`` (0 = one epoch, the paper's), ``learning_rate`` and ``beta`` (0 = the main run's).

Identical contrastive models give d ≡ 0, so ``rank_based`` and ``threshold_and_scale`` give
every token (low + high)/2 = 1 and the run is plain DPO under TIS-DPO's name. That is refused
rather than warned about (a warning scrolls by; the metrics would look like a TIS-DPO run):
``folders`` needs both folders, and the first scored batch must have some d_t ≠ 0. Ask for
DPO's weights explicitly with ``transform='binary'``.
"""

import dataclasses
import functools
import hashlib
import json
import logging

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from mipo_jax.losses import loss_config
from mipo_jax.train import modules
from mipo_jax.train.data import to_device
from mipo_jax.train.refcache import data_fingerprint, weights_hash
from mipo_jax.train.scoring import Scorer, token_logps

log = logging.getLogger("mipo_jax.train")

SIDES = ("positive", "negative")


def transform(d: np.ndarray, mask: np.ndarray, cfg) -> np.ndarray:
    """Weights ``[..., C]`` from raw scores ``d`` on completion tokens (``mask``)."""
    kind = cfg.transform
    low, high = float(cfg.low), float(cfg.high)
    if kind == "binary":
        return np.ones_like(d, np.float32)
    if kind == "threshold_and_scale":
        c = float(cfg.clamp)
        return (low + (np.clip(d, -c, c) + c) / (2 * c) * (high - low)).astype(np.float32)
    if kind == "rank_based":
        from scipy.stats import rankdata

        out = np.ones_like(d, np.float32)
        flat_d, flat_m, flat_o = (x.reshape(-1, x.shape[-1]) for x in (d, mask, out))
        for row in range(flat_d.shape[0]):
            idx = np.nonzero(flat_m[row] > 0)[0]
            if len(idx) == 1:
                flat_o[row, idx] = (low + high) / 2
            elif len(idx) > 1:
                ranks = (rankdata(flat_d[row, idx]) - 1) / (len(idx) - 1)
                flat_o[row, idx] = low + ranks * (high - low)
        return out
    raise ValueError(f"token_weights.transform={kind!r}; choose binary, rank_based, "
                     "threshold_and_scale")  # fmt: skip


# ------------------------------------------------------------------------------------------
# building the contrastive models
# ------------------------------------------------------------------------------------------


def contrastive_config(config, side: str, steps: int) -> mlc.ConfigDict:
    """The config of the run that trains π⁺ (``positive``) or π⁻ (``negative``)."""
    tw = config.token_weights
    sub = mlc.ConfigDict(config.to_dict())  # resolved copy: no reference shared with config
    for section in ("token_weights", "ref_sync", "rounds"):  # a plain DPO / SFT run
        if section in sub:
            del sub[section]
    sub.algorithm = f"{config.algorithm}/{tw.source}_{side}"
    sub.objective = "paired"
    sub.loss = loss_config("reference")
    sub.loss.alpha = float(tw.beta or config.loss.alpha)
    if tw.source == "sft":  # the NLL of the (possibly swapped) chosen response
        sub.objective = "sft"
    if side == "negative":  # chosen and rejected swapped (the original's reverse_dataset)
        cols = dict(config.data.columns or {})
        cols["chosen"], cols["rejected"] = (
            cols.get("rejected", "rejected"),
            cols.get("chosen", "chosen"),
        )
        sub.data.columns = cols
    sub.optim.learning_rate = float(tw.learning_rate or config.optim.learning_rate)
    sub.train.num_steps = int(steps)
    sub.train.update(dict(eval_batches=0, eval_every=0, task_eval_prompts=0))
    sub.sft.steps = 0  # it starts from the reference, which is given
    sub.export.update(dict(hf=True, plot=False, dtype=config.model.param_dtype))
    return sub


# keys that do not change what a contrastive run computes (data content and the starting
# weights enter the key as hashes of their own)
_VOLATILE = {
    "train": ("progress", "log_every"),
    "checkpoint": ("every", "keep", "async_save", "restart"),
    "reference": ("cache_dir", "batch_size"),
    "model": ("init",),
    "data": ("source", "split", "name", "revision", "tokenizer"),
}


def cache_key(reference_hash: str, data_hash: str, subs) -> str:
    """SHA-256 of the reference weights, the training data and the contrastive configs."""
    h = hashlib.sha256(f"{reference_hash}|{data_hash}".encode())
    for sub in subs:
        d = sub.to_dict()
        d.pop("algorithm", None)
        d.pop("arg", None)  # the main config's arguments (its transform, say): already applied
        for section, keys in _VOLATILE.items():
            for k in keys:
                d.get(section, {}).pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:24]


def _global_params_hash(built: modules.Built) -> str:
    params = built.params
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return weights_hash(params, repr(built.config))


def _global_data_hash(data) -> str:
    fp = data_fingerprint(data)
    if jax.process_count() == 1:
        return fp
    parts = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(fp), np.uint8))
    return hashlib.sha256(np.asarray(parts).tobytes()).hexdigest()


def cache_root(config) -> str:
    if config.token_weights.cache_dir:
        return config.token_weights.cache_dir
    from mipo_jax.data.embedded import cache_dir

    return str(cache_dir() / "tisdpo")


@dataclasses.dataclass
class Contrastive:
    """π⁺ and π⁻ as the trainer holds models, and the folders they were loaded from."""

    positive: modules.Built
    negative: modules.Built
    folders: tuple[str, str] = ("", "")


def contrastive_runs(config, reference: modules.Built, train_data) -> tuple[str, list]:
    """(cache key, [config of π⁺'s run, config of π⁻'s run]) for ``source`` dpo or sft."""
    steps = int(config.token_weights.steps) or train_data.iterator.steps_per_epoch(0)
    subs = [contrastive_config(config, side, steps) for side in SIDES]
    key = cache_key(_global_params_hash(reference), _global_data_hash(train_data.data), subs)
    return key, subs


def load_contrastive(config, folders: tuple[str, str], mesh) -> Contrastive:
    """π⁺ and π⁻ from their HF folders, sharded on ``mesh``."""
    load = lambda f, s: modules.load_folder(f, config.model, mesh, f"tisdpo-{s}:{f}")
    pos, neg = (load(f, s) for f, s in zip(folders, SIDES, strict=True))
    return Contrastive(pos, neg, folders=tuple(folders))


# ------------------------------------------------------------------------------------------
# weights per batch
# ------------------------------------------------------------------------------------------


def _scores(pos_params, neg_params, batch, *, scorers: tuple[Scorer, Scorer]):
    """d_t = log π⁺ − log π⁻ on chosen tokens, log π⁻ − log π⁺ on rejected ones."""
    pos = token_logps(pos_params, batch, scorer=scorers[0])
    d = pos - token_logps(neg_params, batch, scorer=scorers[1])
    return d.at[:, 1].multiply(-1.0)


class TokenWeighter:
    """Batch transform: adds ``token_weights`` ``[G, P, 2, C]`` (see the module docstring).

    ``contrastive`` is None for ``transform='binary'`` (every weight 1, no model is run).
    """

    def __init__(self, config, batch_sharding, contrastive: Contrastive | None):
        self.cfg = config.token_weights
        self.contrastive = contrastive
        self.sharding = batch_sharding
        self.checked = False
        if contrastive is not None:
            chunk = int(config.train.logps_chunk)
            scorers = tuple(
                Scorer(m.graph, chunk_size=chunk)
                for m in (contrastive.positive, contrastive.negative)
            )
            fn = functools.partial(_scores, scorers=scorers)
            self.fn = jax.jit(fn, out_shardings=batch_sharding)

    def scores(self, batch: dict) -> np.ndarray:
        """Raw signed scores d ``[G, P, 2, C]`` of this process's batch (0 off the mask)."""
        mask = np.asarray(batch["mask"])
        if self.contrastive is None:
            return np.zeros(mask.shape, np.float32)
        pos, neg = self.contrastive.positive.params, self.contrastive.negative.params
        d = self.fn(pos, neg, to_device(batch, self.sharding))
        if jax.process_count() > 1:
            mesh, spec = self.sharding.mesh, self.sharding.spec
            d = multihost_utils.global_array_to_host_local_array(d, mesh, spec)
        return np.asarray(d).reshape(mask.shape) * mask

    def __call__(self, batch: dict, state=None, step: int = 0) -> dict:
        mask = np.asarray(batch["mask"])
        d = self.scores(batch)
        if not self.checked and self.contrastive is not None:
            self._check(d, mask)
        return {**batch, "token_weights": transform(d, mask, self.cfg) * mask}

    def _check(self, d: np.ndarray, mask: np.ndarray) -> None:
        """Refuse identical contrastive models (d ≡ 0: DPO in disguise); log what d looks like."""
        on = mask > 0
        if not np.any(d[on] != 0):
            c = self.contrastive
            raise ValueError(
                f"TIS-DPO: π⁺ and π⁻ ({c.folders[0]}, {c.folders[1]}) give the same log-prob to "
                "every token of the first batch (d ≡ 0), so every weight would be 1 and the run "
                "plain DPO. Give two different contrastive models, or set "
                "token_weights.transform='binary' to train with DPO's weights on purpose"
            )
        self.checked = True
        mean = lambda side: float(np.mean(d[..., side, :][on[..., side, :]]))
        log.info(
            "TIS-DPO scores on the first batch: mean |d| %.4g; mean d on chosen tokens %+.4g, "
            "on rejected tokens %+.4g (both > 0 when π⁺ favours the chosen responses and π⁻ "
            "the rejected ones)",
            float(np.mean(np.abs(d[on]))), mean(0), mean(1),
        )  # fmt: skip
