"""The command line: short messages and exit code 2 for mistakes; --print_config."""

import importlib
import os
import subprocess
import sys

import pytest

import configs
from mipo_jax import config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "mipo_jax.main", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.loss.beta=0.1", "unknown key loss.beta; did you mean loss.alpha?"),
        ("--config.train.num_step=3", "did you mean train.num_steps"),
        ("--config.data.batch_size=8", "the top-level batch_size"),
        ("--config.train.num_steps=abc", "train.num_steps=abc"),
        ("--config.reference.mode=nope", "reference.mode='nope' is not allowed"),
    ],
)
def test_mistakes_are_one_message_and_exit_2(flag, message, tmp_path):
    out = main("--config=configs/dpo.py:tiny", f"--workdir={tmp_path}", flag)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_bad_config_file_and_argument_and_debug(tmp_path):
    out = main("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "no such config file 'configs/nope.py'" in out.stderr
    out = main("--config=configs/dpo.py:tinyy", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "config argument 'tinyy' is unknown" in out.stderr
    out = main("--config=configs/dpo.py:tiny", f"--workdir={tmp_path}", "--debug",
               "--config.reference.mode=nope")  # fmt: skip
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_print_config_documents_every_key():
    out = main("--config=configs/tisdpo.py", "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token_weights.transform = 'rank_based'" in out.stdout
    assert "# TIS-DPO: binary (= DPO) | rank_based | threshold_and_scale" in out.stdout


def test_every_key_of_every_config_is_documented():
    missing = set()
    for name in configs.names():
        for arg in (None, "tiny"):
            config = importlib.import_module(f"configs.{name}").get_config(arg)
            missing |= {k for k, _ in config_docs.leaves(config) if not config_docs.doc(k)}
    assert not missing, f"add these keys to mipo_jax/config_docs.py DOCS: {sorted(missing)}"
