"""DPO on Llama-3.1-8B(-Instruct) for a TPU slice or a GPU cluster (recipes: launch/README.md).

As ``configs/llama3_1b.py`` (DPO, β = 0.1, AdamW, float32 state, bfloat16 compute, full
remat, FSDP over every device, rows of 2048 tokens), with the 8B shape and a smaller
learning rate. The step's state is 16 bytes per parameter (weights, two AdamW moments, the
live reference) over the FSDP devices: about 120 GiB in all, so it needs a slice whose
devices together hold that plus activations; experiments/bench/README.md (*Memory plan*)
gives the per-device figures for 8, 64 and 256 devices (8 H100 or v5p devices hold it; TPU
v5e needs 64 chips or more, best with ``--config.mesh.tensor=4``). Run:

  python -m mipo_jax.main --config=configs/llama3_8b.py:weights=/data/Llama-3.1-8B-Instruct \
      --workdir=/shared/runs/llama3_8b --config.data.source=my_pairs.jsonl

``weights=<folder>`` (``hf download meta-llama/Llama-3.1-8B-Instruct
--local-dir <folder>``) is the policy's start, the reference and the tokenizer; without it
a random model of the same shape trains (a rehearsal; see llama3_1b). ``:tiny``: a smoke run.
"""

from configs import common
from configs.llama3_1b import make_llama3

# Llama-3.1-8B's config.json (shape keys only; a checkpoint's own config.json wins).
SHAPE = dict(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_embeddings=False,
)


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, weights="")
    return make_llama3("llama3_8b", SHAPE, arg, learning_rate=5e-7)


def sweep(add):
    for beta in (0.05, 0.1):
        add(**{"loss.alpha": beta})
