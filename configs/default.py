"""The main job (``make demo``): MI-DPO with the reference prior on the controlled task.

A tiny Llama-family model is first fine-tuned (SFT) on the task's generating distribution,
which makes it the reference π_ref; MI-DPO (prior ζ = π_ref, i.e. DPO) then trains it on the
task's preference pairs, labelled by its known reward. The exact evaluation reports the true
expected reward before and after and the exact KL to the reference. Run:

  python -m mipo_jax.main --config=configs/default.py --workdir=/tmp/mipo_default
  python -m mipo_jax.demo            # the same, plus a printed before/after summary
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False)
    loss = loss_config("reference")
    loss.alpha = 0.5  # β of DPO: the policy optimum is π_ref · exp(r / β)
    config = common.make(
        "mi_dpo", loss, arg, optimizer="adamw", learning_rate=1e-3, warmup_steps=20, batch_size=32
    )
    if arg.tiny:
        return config
    config.model.update(
        dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=64, compute_dtype="float32")
    )  # fmt: skip
    config.data.update(dict(source="embedded:controlled", max_length=32, row_length=32))
    config.sft.update(dict(steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=20))
    config.train.update(dict(num_steps=200, eval_every=50, eval_batches=8, task_eval_prompts=8))
    config.optim.schedule = "cosine"
    config.optim.end_factor = 0.1
    config.checkpoint.every = 100
    return config


def sweep(add):
    for beta in (0.25, 0.5, 1.0):
        add(**{"loss.alpha": beta})
