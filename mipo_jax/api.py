"""The Python entry points: build a config from an algorithm's name, and run it.

    import mipo_jax

    config = mipo_jax.get_config("simpo", tiny=True)      # configs/simpo.py:tiny
    config.train.num_steps = 20
    summary = mipo_jax.run(config, "runs/simpo")           # same as python -m mipo_jax.main

``run`` is exactly what ``python -m mipo_jax.main`` does after parsing its flags: validate the
config, then train (every stage the config asks for), resuming from ``workdir`` if it holds
checkpoints, and return the summary that is also written to ``workdir/summary.json``.
"""

import importlib


def get_config(name: str, arg: str | None = None, **args):
    """``configs/<name>.py``'s config; ``arg`` and keyword ``args`` as after the colon.

    ``get_config("tdpo", variant="tdpo1", tiny=True)`` equals
    ``--config=configs/tdpo.py:variant=tdpo1,tiny``.
    """
    items = [arg] if arg else []
    for key, value in args.items():
        if value is True:
            items.append(key)
        elif value is not False:
            items.append(f"{key}={value}")
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"configs.{name}":
            raise
        from configs import names

        raise ValueError(
            f"unknown algorithm {name!r}; choose one of: {', '.join(names())}"
        ) from None
    return module.get_config(",".join(items) or None)


def run(config, workdir: str, *, train_data=None, eval_data=None) -> dict:
    """Validate ``config`` and train it in ``workdir`` (resuming); returns the summary.

    ``train_data`` / ``eval_data``: the data itself instead of ``data.source`` /
    ``data.eval_source``: a ``datasets.Dataset``, a ``DatasetDict`` (split ``data.split`` /
    ``data.eval_split``) or a list of row dicts in a TRL format; set ``data.tokenizer``
    (or use a pretrained ``model.init``, whose tokenizer is the default).
    """
    from mipo_jax.train import checks

    checks.validate(config)
    from mipo_jax import paths
    from mipo_jax.train import stages

    path = paths.resolve(workdir)  # local: absolute; gs://, s3://: as given
    return stages.run(config, path, train_data=train_data, eval_data=eval_data)
