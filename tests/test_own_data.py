"""README's "Using your own dataset" recipe, run as a user runs it: from outside the
repository (the package installed by `make`), on files, with a separate eval file and the
real SmolLM2 model; then transformers loads the export and generates."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Test sizes: one short step instead of twenty (every other flag is the README's).
FASTER = ["--config.train.num_steps=1", "--config.train.eval_batches=1",
          "--config.data.row_length=1024", "--config.data.max_length=256"]  # fmt: skip


def readme_recipe() -> list[list[str]]:
    """The commands of the first bash block of README's "Using your own dataset"."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Using your own dataset", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(cmd) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def test_readme_recipe_parses():
    export, train = readme_recipe()
    assert export[:3] == ["python", "-m", "mipo_jax.data.embedded"]
    assert train[:3] == ["python", "-m", "mipo_jax.main"] and "--config.model.init=smollm2" in train
    assert any(a.startswith("--config.data.eval_source=") for a in train)


@pytest.mark.slow
def test_readme_recipe_from_outside_the_repository(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["MIPO_JAX_CACHE"] = str(tmp_path / "cache")
    export, train = readme_recipe()
    for cmd in (export, train + FASTER):
        out = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1500)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    workdir = tmp_path / "runs" / "mine"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["data"]["eval"]["source"].endswith("chat_test.jsonl")  # its own eval file
    assert summary["data"]["train"]["source"].endswith("chat_train.jsonl")
    assert "eval_loss" in (workdir / "metrics.jsonl").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "export")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)
