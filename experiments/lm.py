"""The tiny language model of the reproductions: a reference fine-tuned on the controlled task.

`sft_inits` trains (once per seed, reused afterwards) the model that the LM reproductions
start from and keep as π_ref: ``configs/default.py``'s tiny Llama-family model fine-tuned on
the controlled task's generating distribution (the trainer's SFT stage). A reproduction's
runs then load it with ``model.init = "hf:<export>"``. `deterministic_pairs` draws
preference pairs of the controlled task (`mipo_jax.data.tasks.sentiment`) labelled by the
true reward without noise (ties dropped). `train_curve` reads a run's per-step metrics.
"""

from __future__ import annotations

import json
import os

import numpy as np

import mipo_jax
from experiments import sweep
from mipo_jax.data.tasks import sentiment as S


def small_model(config) -> None:
    """``configs/default.py``'s model (2 layers, width 64, float32), batch 32, adamw 1e-3."""
    config.model.update(
        dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=64, compute_dtype="float32")
    )  # fmt: skip
    config.data.update(dict(max_length=32, row_length=32, tokenizer="toy_words"))
    config.batch_size = 32
    config.optim.update(dict(name="adamw", learning_rate=1e-3, warmup_steps=10))
    config.optim.schedule = "constant"
    config.train.update(dict(progress=False, log_every=1))
    config.checkpoint.every = 100_000
    config.export.update(dict(hf=False, plot=False))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_RUNS = os.path.join(ROOT, "runs", "controlled_sft")  # shared by the reproductions


def sft_inits(seeds, root: str = SFT_RUNS, steps: int = 300, log=print) -> dict[int, str]:
    """``{seed: "hf:<folder>"}``: the controlled task's SFT model per seed (trained once)."""

    def base():
        c = mipo_jax.get_config("default")
        small_model(c)
        c.sft.update(dict(steps=int(steps), batch_size=64, learning_rate=3e-3, warmup_steps=20))
        c.train.update(dict(num_steps=1, eval_every=0, eval_batches=0, task_eval_prompts=0))
        return c

    runs = sweep.run_grid(base, sweep.grid(seed=list(seeds)), root, log=log)
    return {
        r["overrides"]["seed"]: "hf:" + os.path.join(r["workdir"], "sft", "export") for r in runs
    }


def deterministic_pairs(n: int, seed: int) -> list[dict]:
    """``n`` controlled-task pairs (both completions from π_ref), chosen = higher true reward."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n:
        prompt = tuple(int(w) for w in rng.integers(0, len(S.WORDS), rng.choice(S.PROMPT_WORDS)))
        y1 = S.sample_completion(rng, "controlled", prompt)
        y2 = S.sample_completion(rng, "controlled", prompt)
        r1, r2 = S.reward("controlled", y1), S.reward("controlled", y2)
        if r1 == r2:
            continue
        if r2 > r1:
            y1, y2 = y2, y1
        rows.append(
            {"prompt": S.text(prompt) + " " + S.SEPARATOR, "chosen": " " + S.text(y1),
             "rejected": " " + S.text(y2)}
        )  # fmt: skip
    return rows


def train_curve(workdir: str, keys) -> dict[str, np.ndarray]:
    """Per-step training metrics of a run: ``{"step": [...], key: [...]}``."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "train":
                rows.append(row)
    out = {"step": np.array([r["step"] for r in rows])}
    for k in keys:
        out[k] = np.array([r.get(k, np.nan) for r in rows], np.float64)
    return out
