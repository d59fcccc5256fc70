"""TIS-DPO token weights (Liu et al. 2025; exlaw/TIS-DPO ``token_weight_estimation.py``).

Raw score per completion token from two contrastive models π⁺ and π⁻:
d_t = log π⁺(y_t|·) − log π⁻(y_t|·) on chosen tokens and its negative on rejected tokens,
then a ``transform`` (config ``token_weights``):

* ``binary``: every weight 1 (the code's default: the loss is DPO's);
* ``rank_based``: ranks of d_t within the sequence mapped linearly onto [low, high]
  (ties share their mean rank, so equal scores give (low + high)/2);
* ``threshold_and_scale``: clamp d_t to [−clamp, clamp], map linearly onto [low, high].

The contrastive models are HF folders ``token_weights.positive`` / ``.negative``; left empty
both default to the reference, so d_t ≡ 0 and the weights are constant (DPO-equivalent).
"""

import functools

import jax
import numpy as np
from scipy.stats import rankdata

from mipo_jax.train import models as mdl
from mipo_jax.train.step import StepSpec, token_logps

TRANSFORMS = ("binary", "rank_based", "threshold_and_scale")


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
    raise ValueError(f"token_weights.transform={kind!r}; choose one of: {', '.join(TRANSFORMS)}")


class TokenWeighter:
    def __init__(self, config, mesh, batch_sharding):
        self.cfg = config.token_weights
        self.models = None
        pos, neg = self.cfg.get("positive", ""), self.cfg.get("negative", "")
        if pos and neg:
            load = lambda f: mdl.load_folder(f, config.model, mesh, f"hf:{f}")
            self.models = (load(pos), load(neg))
            spec = StepSpec(
                graphs=(("policy", self.models[0].graph),),
                ref_graph=None,
                loss=None,
                tx=None,
                lr=None,
            )
            self.fn = jax.jit(functools.partial(token_logps, spec=spec))
        self.sharding = batch_sharding

    def __call__(self, batch: dict) -> dict:
        mask = np.asarray(batch["mask"])
        if self.models is None:
            d = np.zeros(mask.shape, np.float32)
        else:
            b = jax.device_put({k: v for k, v in batch.items() if k != "example_id"}, self.sharding)
            lp = [np.asarray(self.fn(m.params, b)).reshape(mask.shape) for m in self.models]
            d = lp[0] - lp[1]
            d[..., 1, :] *= -1.0
        return {**batch, "token_weights": transform(d, mask, self.cfg) * mask}
