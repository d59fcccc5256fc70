"""Shared config pieces: argument parsing and the sections every algorithm config has.

An algorithm config is ``get_config(arg)`` returning a ``ConfigDict`` with a ``loss``
section (see ``mipo_jax.losses.config``), the original paper's optimiser defaults and
``arg`` (parsed from ``--config=configs/<name>.py:arg``). ``sweep(add)`` lists the
hyper-parameter grid a paper sweeps.
"""

import ml_collections as mlc

from mipo_jax.data import data_config


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parse ``"tiny,variant=tdpo2"`` into ``{tiny: True, variant: "tdpo2"}``.

    Keys must be among ``defaults``; values take the type of their default. A bare key sets
    a boolean default to True.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value, e.g. {key}=...")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return mlc.ConfigDict(out)


def make(
    name: str,
    loss: mlc.ConfigDict,
    arg: mlc.ConfigDict,
    *,
    optimizer: str = "rmsprop",
    learning_rate: float = 1e-6,
    warmup_steps: int = 150,
    batch_size: int = 64,
    **sections,
) -> mlc.ConfigDict:
    """An algorithm config: name, loss, optimiser defaults, parsed arg, extra sections."""
    config = mlc.ConfigDict()
    config.algorithm = name
    config.objective = "paired"  # "unpaired" for KTO
    config.seed = 0
    config.arg = arg
    config.loss = loss
    config.optim = mlc.ConfigDict(
        dict(name=optimizer, learning_rate=learning_rate, warmup_steps=warmup_steps)
    )
    config.batch_size = batch_size
    for key, value in sections.items():
        config[key] = mlc.ConfigDict(value) if isinstance(value, dict) else value
    add_run_sections(config)
    if arg.get("tiny", False):
        make_tiny(config)
    return config


# --------------------------------------------------------------------------------------
# Sections every config has (model, data, mesh, reference, sft, train, checkpoint, export).
# Defaults train on the embedded controlled task with a small random Llama-family model, so
# every algorithm runs out of the box; point model.init and data.source at your own.
# --------------------------------------------------------------------------------------


def add_run_sections(config: mlc.ConfigDict) -> None:
    """Add the trainer's sections (documented key by key) to an algorithm config."""
    config.optim.warmup_ratio = 0.0  # > 0: warm-up = this fraction of the run (TRL's name)
    config.optim.schedule = "cosine"  # cosine | linear | constant, after linear warm-up
    config.optim.end_factor = 0.0  # final learning rate as a fraction of the peak
    config.optim.clip_norm = 1.0  # global-norm gradient clipping (0 = off)
    config.optim.weight_decay = 0.0  # AdamW only
    config.model = mlc.ConfigDict(
        dict(
            init="random",  # random | hf:<folder or hub id org/name> | gguf:<file> | smollm2
            revision=mlc.FieldReference(None, field_type=str),  # hf:<hub id>: branch/tag/commit
            family="llama",  # shape of a random model (ignored for checkpoints):
            vocab_size=0,  # 0 = the tokenizer's size
            hidden_size=256,
            intermediate_size=768,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            tie_embeddings=True,
            param_dtype="float32",  # runtime policy (also for checkpoints):
            compute_dtype="bfloat16",  # matmul dtype; log-probs and losses run in float32
            remat="none",  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
            scan_layers=True,
            attention_block=128,  # queries per attention block (0 = one block); see README
            # LoRA (rank 0 = off): train adapters W + (alpha/rank)·A·B on these projections
            # (q,k,v,o,gate,up,down) with input dropout; see mipo_jax/train/adapters.py
            lora=mlc.ConfigDict(
                dict(rank=0, alpha=16.0, targets="q,k,v,o,gate,up,down", dropout=0.0)
            ),
            attention_impl="blocked",  # blocked | flash (memory ~T) | cudnn | splash | auto
            mlp_impl="autodiff",  # autodiff | custom_vjp (gated MLP, less saved; no biases)
        )
    )
    config.data = data_config(max_length=512)  # see mipo_jax.data.pipeline.data_config
    del config.data["batch_size"]  # the trainer's batch is the top-level batch_size (global)
    # fixed row length T (= max_length unless set): one compiled step shape for the whole run
    config.data.row_length = config.data.get_ref("max_length")
    config.data.groups = 1  # packed layouts: packed groups (rows x row_length) per step/process
    config.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
    config.reference = mlc.ConfigDict(
        dict(
            mode="live",  # live (frozen copy) | cached (on-disk log-probs) | dataset (columns)
            cache_dir="",  # cached mode; "" = $MIPO_JAX_CACHE/reference or ~/.cache/mipo_jax
            batch_size=64,  # examples per forward when building the cache
        )
    )
    config.sft = mlc.ConfigDict(  # optional SFT stage whose result is policy and reference
        dict(steps=0, batch_size=32, learning_rate=1e-3, warmup_steps=10)
    )
    config.train = mlc.ConfigDict(
        dict(
            num_steps=1000,  # DICE/SPIN: rounds.num_rounds x rounds.steps_per_round instead
            num_epochs=0,  # > 0: train this many passes over the data instead of num_steps
            grad_accum=1,  # micro-batches per step (loss, grads, metrics as one batch)
            logps_chunk=256,  # tokens per chunk of the log-prob path (peak ~ chunk x V)
            log_every=1,
            eval_every=200,  # 0 = only at the end
            eval_batches=8,
            task_eval_prompts=8,  # embedded controlled/arithmetic tasks: prompts scored exactly
            max_nonfinite=5,  # this many non-finite steps in a row stop the run
            progress=True,  # tqdm progress bar
        )
    )
    config.checkpoint = mlc.ConfigDict(  # restart: when no checkpoint restores, start over
        dict(every=500, keep=3, async_save=True, restart=False)  # (moving them aside)
    )
    config.export = mlc.ConfigDict(dict(hf=True, dtype="float32", plot=True))  # HF folder, PNG


def make_tiny(config: mlc.ConfigDict) -> None:
    """Smoke-test sizes: a 2-layer width-32 model, 2 steps, 4 pairs, no periodic work."""
    config.model.update(
        dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, max_position_embeddings=128, compute_dtype="float32")
    )  # fmt: skip
    config.batch_size = 4
    config.optim.warmup_steps = 1
    config.data.max_length = 64
    config.train.update(dict(num_steps=2, eval_every=0, eval_batches=1, progress=False,
                             task_eval_prompts=0))  # fmt: skip
    config.checkpoint.every = 1000
    config.export.hf = False
    config.reference.batch_size = 16
    if "rounds" in config:
        config.rounds.num_rounds = 2
        config.rounds.steps_per_round = 1
        if "samples_per_prompt" in config.rounds:
            config.rounds.samples_per_prompt = 4
    if "prior_model" in config:
        config.prior_model.samples_per_step = 4
    if "ref_sync" in config:
        config.ref_sync.sync_steps = 1
