"""Optimiser and learning-rate schedule from the ``optim`` section of a config.

``optim.name``: ``adamw`` or ``rmsprop`` (the DPO paper's choice, with PyTorch's defaults:
decay 0.99, ε added outside the square root). ``optim.schedule``: linear warm-up over
``warmup_steps`` then ``cosine``, ``linear`` (to ``end_factor`` · peak) or ``constant``.
Gradients are clipped by global norm (``clip_norm``; 0 disables) before the update.
"""

import optax

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("cosine", "linear", "constant")


def schedule(optim, total_steps: int) -> optax.Schedule:
    """Warm-up then decay to ``end_factor`` · ``learning_rate`` at ``total_steps``."""
    peak, warmup = float(optim.learning_rate), int(optim.warmup_steps)
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
