"""Optimiser and learning-rate schedule from the ``optim`` section of a config.

``optim.name``: ``adamw`` or ``rmsprop`` (the DPO paper's choice, with PyTorch's defaults:
decay 0.99, ε added outside the square root). ``optim.schedule``: linear warm-up over
``warmup_steps`` (or, when ``warmup_ratio > 0``, TRL's name, that fraction of the run's
steps) then ``cosine``, ``linear`` (to ``end_factor`` · peak) or ``constant``.
Gradients are clipped by global norm (``clip_norm``; 0 disables) before the update.
"""

import logging
import math

import optax

log = logging.getLogger("mipo_jax.train")

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(optim, total_steps: int) -> int:
    """Warm-up steps: ``warmup_ratio`` of the run when set (> 0), else ``warmup_steps``."""
    ratio = float(optim.get("warmup_ratio", 0.0))
    return math.ceil(ratio * total_steps) if ratio > 0 else int(optim.warmup_steps)


def schedule(optim, total_steps: int) -> optax.Schedule:
    """Warm-up then decay to ``end_factor`` · ``learning_rate`` at ``total_steps``."""
    peak, warmup = float(optim.learning_rate), warmup_steps(optim, total_steps)
    if warmup >= total_steps:
        log.warning(
            "the warm-up (%d steps) is as long as the run (%d steps): the learning rate never "
            "reaches its peak %g (step %d trains at %.3g). Set optim.warmup_ratio (e.g. 0.1, "
            "a fraction of the run) or fewer optim.warmup_steps",
            warmup, total_steps, peak, total_steps - 1, peak * (total_steps - 1) / warmup,
        )  # fmt: skip
    end = peak * float(optim.get("end_factor", 0.0))
    decay = max(int(total_steps) - warmup, 1)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup > 0 else None
    kind = optim.get("schedule", "constant")
    if kind == "cosine":
        tail = optax.cosine_decay_schedule(peak, decay, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        tail = optax.linear_schedule(peak, end, decay)
    elif kind == "constant":
        tail = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule={kind!r}; choose one of: {', '.join(SCHEDULES)}")
    return tail if warm is None else optax.join_schedules([warm, tail], [warmup])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)``: clip by global norm, then AdamW or RMSprop on the schedule."""
    lr = schedule(optim, total_steps)
    name = optim.name
    if name == "adamw":
        core = optax.adamw(
            lr,
            b1=optim.get("b1", 0.9),
            b2=optim.get("b2", 0.999),
            eps=optim.get("eps", 1e-8),
            weight_decay=optim.get("weight_decay", 0.0),
        )
    elif name == "rmsprop":  # torch.optim.RMSprop defaults, as the DPO reference code uses
        core = optax.rmsprop(
            lr, decay=optim.get("decay", 0.99), eps=optim.get("eps", 1e-8), eps_in_sqrt=False
        )
    else:
        raise ValueError(f"optim.name={name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    clip = float(optim.get("clip_norm", 0.0))
    tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
    return tx, lr
