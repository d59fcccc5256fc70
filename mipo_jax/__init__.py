"""mipo_jax: DPO and its variants as one loss with a prior (MI-DPO), in JAX/Flax.

``mipo_jax.get_config(name, ...)`` and ``mipo_jax.run(config, workdir)`` are the Python API
(`mipo_jax.api`); importing the package itself loads nothing heavy.
"""

__all__ = ["get_config", "run"]


def __getattr__(name):
    if name in __all__:
        from mipo_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'mipo_jax' has no attribute {name!r}")
