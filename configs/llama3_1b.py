"""DPO on Llama-3.2-1B(-Instruct) for a TPU slice or a GPU cluster (recipes: launch/README.md).

DPO (MI-DPO with the reference prior, β = 0.1), AdamW, float32 parameters and optimiser
state, bfloat16 compute, full rematerialisation of each layer, FSDP over every device
(``mesh.fsdp = -1``), rows of 2048 tokens (prompt up to 1024, completion up to 1024). The
per-device memory of this step on 8, 64 and 256 devices is in experiments/bench/README.md
(*Memory plan*). Run:

  python -m mipo_jax.main --config=configs/llama3_1b.py:weights=/data/Llama-3.2-1B-Instruct \
      --workdir=/shared/runs/llama3_1b --config.data.source=my_pairs.jsonl

``weights=<folder>``: a Hugging Face folder (config.json, safetensors, tokenizer), e.g. from
``hf download meta-llama/Llama-3.2-1B-Instruct --local-dir <folder>``; it is
the policy's start, the reference and the tokenizer. Without it the policy is a *random*
model of the same shape with the bundled SmolLM2 tokenizer: a rehearsal of memory and
speed on a new slice that needs no download. ``batch_size`` (pairs per step, global) must
be a multiple of ``mesh.data × mesh.fsdp``; each device then holds
``batch_size / (grad_accum · data · fsdp)`` pairs per micro-batch (the plan measured 1).
``:tiny`` swaps in a tiny random model and the embedded chat set (a seconds-long smoke run).
"""

import ml_collections as mlc

from configs import common
from mipo_jax.losses import loss_config

# Llama-3.2-1B's config.json (shape keys only; a checkpoint's own config.json wins).
SHAPE = dict(
    family="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_embeddings=True,
)


def make_llama3(name: str, shape: dict, arg: mlc.ConfigDict, learning_rate: float):
    """The shared pod config of the Llama-3 files (this one and ``llama3_8b``)."""
    loss = loss_config("reference")
    loss.alpha = 0.1
    config = common.make(
        name, loss, arg, optimizer="adamw", learning_rate=learning_rate, warmup_steps=150,
        batch_size=64,
    )  # fmt: skip
    config.data.update(dict(source="embedded:chat", max_completion_length=48, completion_width=48))
    if arg.tiny:  # common.make already made the model and the run tiny
        config.data.update(dict(tokenizer="chat_bpe", max_length=256))
        return config
    config.model.update(dict(shape, compute_dtype="bfloat16", remat="full"))
    config.model.init = f"hf:{arg.weights}" if arg.weights else "random"
    config.data.tokenizer = arg.weights or "smollm2"
    config.data.update(
        dict(max_length=2048, max_prompt_length=1024, max_completion_length=1024,
             completion_width=1024)
    )  # fmt: skip
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config.train.update(dict(num_steps=1000, eval_every=200, eval_batches=4, task_eval_prompts=0))
    config.checkpoint.every = 200
    config.export.dtype = "bfloat16"
    return config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, weights="")
    return make_llama3("llama3_1b", SHAPE, arg, learning_rate=1e-6)


def sweep(add):
    for beta in (0.05, 0.1):
        add(**{"loss.alpha": beta})
