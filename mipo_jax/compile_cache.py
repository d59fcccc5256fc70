"""JAX's persistent compilation cache: a run reuses the programs an earlier run compiled.

    from mipo_jax import compile_cache
    compile_cache.enable()   # before anything is jitted

The directory is ``cache_dir`` if given, else ``$MIPO_JAX_COMPILE_CACHE``, else JAX's own
setting when the user made one (``JAX_COMPILATION_CACHE_DIR``: then JAX's settings are left
as they are), else ``$MIPO_JAX_CACHE/jax_cache`` (default ``~/.cache/mipo_jax/jax_cache``,
next to the reference log-prob cache). ``MIPO_JAX_COMPILE_CACHE=off`` (or ``0``, ``false``,
``none``) turns it off.
JAX keys each entry by the program, the compile options, the JAX/XLA version and the
device, so a stale entry is never used. Entries are kept for programs that took at least
``min_compile_secs`` to compile: 0.1 s here, as JAX's own default of 1 s skips most of a
run's small programs, which together cost seconds of start-up. Call `enable` before the
first compilation: JAX sets its cache up once.
"""

import os
from pathlib import Path

import jax

ENV = "MIPO_JAX_COMPILE_CACHE"
_OFF = ("off", "0", "false", "none", "no")


def default_dir() -> Path:
    base = os.environ.get("MIPO_JAX_CACHE") or Path.home() / ".cache" / "mipo_jax"
    return Path(base) / "jax_cache"


def enable(cache_dir: str | os.PathLike | None = None, min_compile_secs: float = 0.1) -> str | None:
    """Turn the cache on (idempotent); returns its directory, or None when turned off."""
    if cache_dir is None:
        env = os.environ.get(ENV)
        if env is not None and env.strip().lower() in _OFF:
            return None
        if not env and jax.config.values.get("jax_compilation_cache_dir"):
            return jax.config.values["jax_compilation_cache_dir"]  # the user's JAX setting
        cache_dir = env or default_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
