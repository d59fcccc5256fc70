"""`mipo_jax.compile_cache`: a second process reuses the first one's compiled programs.

Each case runs in a fresh interpreter (the cache is process-wide JAX state).
"""

import os
import subprocess
import sys

PROGRAM = """
import os, sys
from mipo_jax import compile_cache
# every program is kept (the default skips those under 0.1 s: timing-dependent here)
path = compile_cache.enable(*sys.argv[1:], min_compile_secs=0.0)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
f(jnp.ones((64, 64))).block_until_ready()
print(path)
"""


def _run(env, *args):
    """Run PROGRAM in a fresh interpreter with ``env`` added; the cache path it printed."""
    env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, *args], env=env, capture_output=True, text=True,
        timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _entries(path):
    """{entry: modification time}: a program compiled again would be written again."""
    names = sorted(p for p in os.listdir(path) if not p.startswith("."))
    return {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in names}


def test_programs_are_written_once_and_reused(tmp_path):
    cache = tmp_path / "jit"
    assert _run({}, str(cache)) == str(cache)
    first = _entries(cache)
    assert any(name.startswith("jit__lambda") for name in first)
    _run({}, str(cache))
    assert _entries(cache) == first  # read back: no entry was written again


def test_directory_from_environment_and_off(tmp_path):
    base = tmp_path / "mipo"
    assert _run({"MIPO_JAX_CACHE": str(base)}) == str(base / "jax_cache")
    assert _entries(base / "jax_cache")
    own = tmp_path / "own"
    assert _run({"MIPO_JAX_COMPILE_CACHE": str(own)}) == str(own)
    off = tmp_path / "off"
    assert _run({"MIPO_JAX_COMPILE_CACHE": "off", "MIPO_JAX_CACHE": str(off)}) == "None"
    assert not off.exists()
    jax_own = tmp_path / "jax_own"  # JAX's own variables, set by the user: kept as they are
    env = {"JAX_COMPILATION_CACHE_DIR": str(jax_own), "MIPO_JAX_CACHE": str(off),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    assert _run(env) == str(jax_own)
    assert _entries(jax_own) and not off.exists()
