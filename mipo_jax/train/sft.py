"""A short supervised fine-tuning stage that turns the starting model into the reference.

``sft.steps > 0`` runs it before preference training. The data is the task's own generating
distribution for the embedded controlled tasks (fresh draws from the known π_ref, so the SFT
model approximates it, as in the DPO paper's IMDb setting), and the chosen responses of the
training set otherwise. The loss is the token-mean negative log-likelihood of completions.
The result is exported as an HF folder in ``<workdir>/sft`` and reloaded from there on
resume, so the reference of a resumed run is the same model (its source is recorded).
"""

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from mipo_jax.data.encoding import tokenize_records
from mipo_jax.data.iterator import PreferenceIterator
from mipo_jax.data.packing import Layout
from mipo_jax.data.tasks import sentiment
from mipo_jax.train import optim
from mipo_jax.train.step import StepSpec, token_logps

log = logging.getLogger("mipo_jax.train")
TASKS = {"embedded:controlled": "controlled", "embedded:length_biased": "length_biased"}


def task_records(task: str, n: int, seed: int) -> list[dict]:
    """``n`` (prompt, completion) draws from the task's generating distribution π_ref."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = sentiment.PROMPT_WORDS
        prompt = tuple(int(w) for w in rng.integers(0, len(sentiment.WORDS), rng.choice(words)))
        y = sentiment.sample_completion(rng, task, prompt)
        rows.append(
            {"prompt": sentiment.text(prompt), "completion": " " + sentiment.text(y), "label": True}
        )
    return rows


def sft_data(config, tokenizer, train=None):
    """Tokenised SFT examples, one completion each: task draws, or the train set's chosen."""
    task = TASKS.get(config.data.source)
    if task is not None:
        n = min(int(config.sft.steps) * int(config.sft.batch_size), 200_000)
        return tokenize_records(task_records(task, n, config.seed + 17), tokenizer, kind="unpaired")
    if train is None:
        raise ValueError("SFT on a dataset needs its tokenised training split")
    return dataclasses.replace(train, completions=train.completions[:1], ref_logps=None, label=None)


def _nll(params, batch, spec):
    lp = token_logps(params, batch, spec=spec)
    mask = batch["mask"].reshape(lp.shape)
    return -jnp.sum(lp * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _sft_step(params, opt_state, batch, *, spec, tx):
    loss, grads = jax.value_and_grad(_nll)(params, batch, spec)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def run(config, policy, tokenizer, mesh, batch_sharding, *, train=None, writer=None):
    """Fine-tune ``policy`` (a ``models.Built``); returns the new params."""
    s = config.sft
    data = sft_data(config, tokenizer, train)
    layout = Layout(kind="padded", batch_size=int(s.batch_size), length_multiple=8)
    it = PreferenceIterator(data, layout, seed=config.seed, process_index=0, process_count=1)
    opt = mlc.ConfigDict(
        dict(name="adamw", learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
             schedule="cosine", clip_norm=1.0, weight_decay=0.0, end_factor=0.1)
    )  # fmt: skip
    tx, _ = optim.make_optimizer(opt, int(s.steps))
    spec = StepSpec(graphs=(("policy", policy.graph),), ref_graph=None, loss=None, tx=tx, lr=None)
    p_sh = policy.shardings
    step = jax.jit(
        functools.partial(_sft_step, spec=spec, tx=tx),
        donate_argnums=(0, 1),
        out_shardings=(p_sh, None, None),
    )
    params = jax.tree.map(jnp.copy, policy.params)
    opt_state = jax.jit(tx.init)(params)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(int(s.steps)):
            batch = next(it)
            batch.pop("label", None)
            batch.pop("example_id", None)
            batch.pop("ref_logps", None)
            params, opt_state, loss = step(params, opt_state, jax.device_put(batch, batch_sharding))
            losses.append(loss)
            if writer is not None and (i + 1) % max(1, int(s.steps) // 20) == 0:
                writer.write(i + 1, {"nll": float(np.mean(jax.device_get(losses[-20:])))}, "sft")
    final = float(np.mean(jax.device_get(losses[-20:])))
    log.info("SFT: %d steps, final NLL %.4f per token", int(s.steps), final)
    return params, final


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, "sft")


def save(graph, params, tokenizer, workdir: str) -> str:
    from mipo_jax.hf.export import save_pretrained

    folder = export_dir(workdir)
    save_pretrained(nnx.merge(graph, params), folder, tokenizer=tokenizer)
    return folder
