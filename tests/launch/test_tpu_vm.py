"""launch/tpu_vm.sh: the gcloud commands each step prints under --dry-run (and runs without
it: a fake gcloud records them), read back as argument lists the way a shell would."""

import os
import shlex
import subprocess
import tarfile

import pytest

from tests import multiprocess_worker as w

SCRIPT = str(w.REPO / "launch" / "tpu_vm.sh")
QR = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with a gcloud that logs each call: its arguments, NUL-separated, then a newline."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" gcloud "$@" >> {log}\necho >> {log}\n')
    gcloud.chmod(0o755)
    return bin_dir, log


def tpu_vm(tmp_path, fake, *args, env=None) -> subprocess.CompletedProcess:
    bin_dir, _ = fake
    full = {k: v for k, v in os.environ.items() if k != "RUNTIME"}
    full.update(PATH=os.pathsep.join([str(bin_dir), full["PATH"]]), TMPDIR=str(tmp_path))
    full.update(env or {})
    return subprocess.run(
        ["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=60
    )


def dry_run(tmp_path, fake, *args, env=None) -> list[list[str]]:
    """The printed commands as argument lists; nothing may have run."""
    proc = tpu_vm(tmp_path, fake, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not fake[1].exists(), "--dry-run ran gcloud"
    return [shlex.split(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
        ("v4-8", "tpu-ubuntu2204-base"),
    ],
)
def test_create_is_a_queued_resource_with_the_accelerators_runtime(
    tmp_path, fake_gcloud, accelerator, runtime
):
    got = dry_run(tmp_path, fake_gcloud, "create", "mipo", "us-east5-a", accelerator, "--spot")
    assert got == [
        QR + ["create", "mipo", "--node-id=mipo", "--zone=us-east5-a",
              f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", "--spot"]
    ]  # fmt: skip


def test_create_needs_a_runtime_for_an_unknown_accelerator(tmp_path, fake_gcloud):
    proc = tpu_vm(tmp_path, fake_gcloud, "--dry-run", "create", "mipo", "z", "v9-8")
    assert proc.returncode != 0 and "set RUNTIME=" in proc.stderr and proc.stdout == ""
    got = dry_run(tmp_path, fake_gcloud, "create", "mipo", "z", "v9-8", env={"RUNTIME": "r1"})
    assert got[0][-1] == "--runtime-version=r1"


def test_run_copies_the_checkout_then_starts_every_worker(tmp_path, fake_gcloud):
    args = ["--config=configs/llama3_1b.py", "--workdir=gs://bucket/llama3 1b's run"]
    got = dry_run(tmp_path, fake_gcloud, "run", "mipo", "europe-west4-a", "--", *args)
    tarball = str(tmp_path / "mipo_jax-mipo.tar.gz")
    repo = str(w.REPO)
    ssh = VM + ["ssh", "mipo", "--zone=europe-west4-a", "--worker=all"]
    assert got[0] == ["git", "-C", repo, "ls-files", "-z", "--cached", "--others",
                      "--exclude-standard", "|", "tar", "-czf", tarball, "-C", repo, "--null",
                      "-T", "-"]  # fmt: skip
    assert got[1] == VM + ["scp", tarball, "mipo:mipo_jax.tar.gz", "--zone=europe-west4-a",
                           "--worker=all"]  # fmt: skip
    assert got[2] == ssh + [
        "--command=mkdir -p ~/mipo_jax && tar -xzf ~/mipo_jax.tar.gz -C ~/mipo_jax"
    ]
    assert got[3][:-1] == ssh and got[3][-1].startswith("--command=")
    remote = shlex.split(got[3][-1].removeprefix("--command="))  # as the workers' shell reads it
    assert remote == ["cd", "~/mipo_jax", "&&", "bash", "launch/run_tpu.sh", *args]
    assert len(got) == 4


def test_wait_ssh_delete(tmp_path, fake_gcloud):
    assert dry_run(tmp_path, fake_gcloud, "wait", "mipo", "z") == [
        QR + ["describe", "mipo", "--zone=z", "--format=value(state.state)"]
    ]
    assert dry_run(tmp_path, fake_gcloud, "ssh", "mipo", "z", "--", "ls ~ | wc -l") == [
        VM + ["ssh", "mipo", "--zone=z", "--worker=all", "--command=ls ~ | wc -l"]
    ]
    assert dry_run(tmp_path, fake_gcloud, "delete", "mipo", "z") == [
        QR + ["delete", "mipo", "--zone=z", "--force", "--quiet"]
    ]


def test_without_dry_run_the_same_commands_run(tmp_path, fake_gcloud):
    """copy for real (fake gcloud): the tarball holds the checkout without .git or .venv."""
    want = dry_run(tmp_path, fake_gcloud, "copy", "mipo", "z")[1:]
    proc = tpu_vm(tmp_path, fake_gcloud, "copy", "mipo", "z")
    assert proc.returncode == 0, proc.stderr
    calls = [c.split("\0") for c in fake_gcloud[1].read_text().split("\0\n")[:-1]]
    assert calls == want
    with tarfile.open(tmp_path / "mipo_jax-mipo.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/run_tpu.sh", "mipo_jax/main.py", "configs/llama3_8b.py"} <= names
    assert not any(n.startswith((".git/", ".venv/")) or "__pycache__" in n for n in names)
