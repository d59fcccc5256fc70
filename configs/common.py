"""Shared config pieces: argument parsing and the sections every algorithm config has.

An algorithm config is ``get_config(arg)`` returning a ``ConfigDict`` with a ``loss``
section (see ``mipo_jax.losses.config``), the original paper's optimiser defaults and
``arg`` (parsed from ``--config=configs/<name>.py:arg``). ``sweep(add)`` lists the
hyper-parameter grid a paper sweeps.
"""

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parse ``"tiny,variant=tdpo2"`` into ``{tiny: True, variant: "tdpo2"}``.

    Keys must be among ``defaults``; values take the type of their default. A bare key sets
    a boolean default to True.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value, e.g. {key}=...")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return mlc.ConfigDict(out)


def make(
    name: str,
    loss: mlc.ConfigDict,
    arg: mlc.ConfigDict,
    *,
    optimizer: str = "rmsprop",
    learning_rate: float = 1e-6,
    warmup_steps: int = 150,
    batch_size: int = 64,
    **sections,
) -> mlc.ConfigDict:
    """An algorithm config: name, loss, optimiser defaults, parsed arg, extra sections."""
    config = mlc.ConfigDict()
    config.algorithm = name
    config.objective = "paired"  # "unpaired" for KTO
    config.seed = 0
    config.arg = arg
    config.loss = loss
    config.optim = mlc.ConfigDict(
        dict(name=optimizer, learning_rate=learning_rate, warmup_steps=warmup_steps)
    )
    config.batch_size = batch_size
    for key, value in sections.items():
        config[key] = mlc.ConfigDict(value) if isinstance(value, dict) else value
    return config
