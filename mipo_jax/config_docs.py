"""The config reference: what every key means, and help for mistyped keys.

    python -m mipo_jax.main --config=configs/dpo.py --print_config   # resolved, key by key

`DOCS` documents every key any ``configs/*.py`` can have (a test checks that none is
missing). `describe` prints a resolved config with them; `unknown_key` turns a mistyped
command-line key into a short message with the nearest existing keys.
"""

import difflib

DOCS = {
    # -- the algorithm ---------------------------------------------------------------------
    "algorithm": "name of the algorithm (recorded in summaries and checkpoints)",
    "objective": "paired (preference pairs, MI-DPO loss) | unpaired (KTO) | sft",
    "seed": "model initialisation, dropout, sampling and the data order",
    "arg.*": "the config file's argument, as parsed from --config=FILE:ARG",
    "batch_size": "pairs per optimiser step, over all processes and micro-batches",
    "hdpo_beta": "H-DPO's β (loss.alpha = a·β follows it)",
    "gamma_beta_ratio": "SimPO's γ/β (the margin follows it)",
    # -- loss ------------------------------------------------------------------------------
    "loss.alpha": "DPO's β (the scale of the implicit reward); MI-DPO's α",
    "loss.normalize": "sum | mean: mean divides log π − log ζ by the completion length",
    "loss.margin": "subtracted from the logit (SimPO's γ)",
    "loss.prior.name": "the prior ζ: it decides the algorithm (README table)",
    "loss.prior.temperature": "tempered_reference (H-DPO): ζ = π_ref^(1/a), a < 1 sharpens",
    "loss.prior.length_coef": "length_tilted_reference (R-DPO): α_R per token",
    "loss.prior.vocab_size": "token_uniform: V of ζ = V^−|y|",
    "loss.prior.gamma": "simpo (mapping ii): SimPO's γ",
    "loss.prior.kl_coef": "sequential_kl (TDPO): weight of the per-token KL (TDPO2's α)",
    "loss.prior.stop_grad_chosen": "sequential_kl: detach the chosen side's KL (TDPO2)",
    "loss.prior.ld_alpha": "length_desensitized (LD-DPO): weight of the excess tokens",
    "loss.prior.dpop_lambda": "dpop (DPO-Positive): λ of the chosen-likelihood penalty",
    "loss.links": "link function(s) turning the logit into a loss (TRL's loss_type names)",
    "loss.link_weights": "one weight per link (a mixture, as TRL's loss_weights)",
    "loss.label_smoothing": "ε of the cdpo / robust / exo_pair / aot links",
    "loss.discopop_tau": "DiscoPOP's τ",
    "loss.f_divergence": "score of the log-ratio: reverse_kl (DPO) | forward_kl | "
    "js_divergence | alpha_divergence",
    "loss.f_alpha": "alpha_divergence's α",
    "loss.weighting": "none | wpo (WPO's per-pair weights)",
    "loss.trl_order": "True: score then length-normalise, as TRL (ipo, sigmoid_norm); False: "
    "MI-DPO's g(ρ/|y|)",
    "loss.sft_weight": "weight of the chosen response's NLL (RPO, CPO, ORPO)",
    "loss.l1_mask_u": "SparsePO's λ_u (L1 of the reward mask)",
    "loss.l1_mask_d": "SparsePO's λ_d (L1 of the KL mask)",
    "loss.mi_weight": "weight of the learnable prior's mutual-information term",
    "kto.beta": "KTO's β",
    "kto.desirable_weight": "KTO's weight of desirable examples",
    "kto.undesirable_weight": "KTO's weight of undesirable examples",
    "kto.loss_type": "kto | apo_zero_unpaired",
    # -- optimiser -------------------------------------------------------------------------
    "optim.name": "adamw | rmsprop (PyTorch's defaults, the DPO paper's)",
    "optim.learning_rate": "peak learning rate",
    "optim.warmup_steps": "linear warm-up from 0 over this many steps",
    "optim.warmup_ratio": "> 0: the warm-up is this fraction of the run (TRL's warmup_ratio)",
    "optim.schedule": "cosine | linear | constant, after the warm-up",
    "optim.end_factor": "final learning rate as a fraction of the peak",
    "optim.clip_norm": "global-norm gradient clipping (0 = off)",
    "optim.weight_decay": "AdamW's decoupled weight decay",
    # -- model -----------------------------------------------------------------------------
    "model.init": "random | hf:<folder or hub id> | gguf:<file> | smollm2 (bundled)",
    "model.revision": "hf:<hub id>: branch, tag or commit (None = main)",
    "model.family": "llama | mistral | qwen2 | qwen3 | gpt2 (random models only)",
    "model.vocab_size": "random models: vocabulary size (0 = the tokenizer's)",
    "model.hidden_size": "random models: width D",
    "model.intermediate_size": "random models: feed-forward width F",
    "model.num_layers": "random models: layers L",
    "model.num_heads": "random models: attention heads",
    "model.num_kv_heads": "random models: key/value heads (GQA)",
    "model.head_dim": "random models: width of a head",
    "model.max_position_embeddings": "random models: longest position",
    "model.rope_theta": "random models: RoPE base",
    "model.tie_embeddings": "random models: unembedding = embedding",
    "model.param_dtype": "dtype of parameters and optimiser state (also for checkpoints)",
    "model.compute_dtype": "matmul dtype; log-probs and losses always run in float32",
    "model.remat": "none | full | dots_saveable | dots_with_no_batch_dims_saveable",
    "model.scan_layers": "scan over layers (one compiled layer) instead of unrolling",
    "model.attention_block": "queries per attention block (0 = one block)",
    "model.attention_impl": "blocked | flash (memory linear in T, pure JAX) | cudnn (GPU) | "
    "splash (TPU) | auto (by backend, flash as the fallback)",
    "model.mlp_impl": "autodiff | custom_vjp (gated MLP backward that saves less)",
    "model.lora.rank": "LoRA adapters' rank (0 = off: every weight trains)",
    "model.lora.alpha": "LoRA scale α (the update is (α/r)·A·B)",
    "model.lora.targets": "projections that get adapters: any of q,k,v,o,gate,up,down",
    "model.lora.dropout": "dropout on the adapters' input",
    # -- data ------------------------------------------------------------------------------
    "data.source": "file or glob (.jsonl .json .parquet .csv), hub id, or embedded:NAME",
    "data.split": "split of the source used for training",
    "data.eval_source": "evaluation rows from another source ('' = data.source)",
    "data.eval_split": "split of the evaluation source (must exist where there are splits)",
    "data.eval_fraction": "> 0: hold out this fraction of the training rows for evaluation",
    "data.name": "hub dataset config name",
    "data.revision": "hub dataset revision (a commit, tag or branch)",
    "data.columns.*": "rename: {ours: yours}, e.g. {'prompt': 'question'}",
    "data.format": "auto | preference | implicit_prompt | unpaired (detected from columns)",
    "data.tokenizer": "embedded name, smollm2, folder or hub id ('' = the pretrained model's, "
    "else the embedded set's)",
    "data.add_bos": "auto | True | False (standard rows; chat rows follow the template)",
    "data.eos_token": "token that ends each completion (default: the tokenizer's EOS)",
    "data.max_length": "prompt + completion tokens kept per sequence",
    "data.max_prompt_length": "prompt tokens kept",
    "data.max_completion_length": "completion tokens kept",
    "data.truncation_mode": "keep_end (drop the prompt's start first) | keep_start",
    "data.bad_input": "error (stop, naming file, row and problem) | skip (drop and count)",
    "data.layout": "padded | pairs (packed pairs) | shared_prompt (prompt computed once)",
    "data.rows": "packed layouts: rows per group",
    "data.groups": "packed layouts: groups per step and process",
    "data.row_length": "fixed row length T (padded and packed): one compiled shape",
    "data.max_pairs": "packed layouts: pair slots per group",
    "data.length_multiple": "padded: T rounded up to a multiple of this",
    "data.bucket_window": "padded: batches per length-sorting window (0 = none)",
    "data.lookahead": "packed layouts: examples per planning window",
    "data.completion_width": "C, the completion slots per side (default: the longest)",
    "data.seed": "the data order",
    "data.num_epochs": "passes the data iterator makes (None = endless); caps the run",
    "data.drop_remainder": "drop the last incomplete batch of an epoch",
    # -- run -------------------------------------------------------------------------------
    "mesh.data": "data-parallel devices (-1 = the devices left)",
    "mesh.fsdp": "devices sharding parameters and optimiser state (-1 = the devices left)",
    "mesh.tensor": "tensor-parallel devices",
    "reference.mode": "live (frozen copy) | cached (on-disk log-probs) | dataset (columns)",
    "reference.cache_dir": "cached mode: '' = $MIPO_JAX_CACHE/reference",
    "reference.batch_size": "examples per forward when building the cache",
    "sft.steps": "SFT stage before training (0 = none); its result is policy and reference",
    "sft.batch_size": "SFT stage: sequences per step",
    "sft.learning_rate": "SFT stage: AdamW peak learning rate (cosine to 0.1×)",
    "sft.warmup_steps": "SFT stage: warm-up steps",
    "train.num_steps": "optimiser steps (DICE/SPIN: rounds × steps per round)",
    "train.num_epochs": "> 0: train this many passes over the data (TRL's num_train_epochs)",
    "train.grad_accum": "micro-batches per step (loss, gradients, metrics as one batch)",
    "train.logps_chunk": "tokens per chunk of the log-prob path (peak memory ~ chunk × V)",
    "train.log_every": "steps between metrics rows",
    "train.eval_every": "steps between evaluations (0 = only before and after)",
    "train.eval_batches": "batches of the eval split per evaluation (0 = none)",
    "train.task_eval_prompts": "embedded controlled/arithmetic tasks: prompts scored exactly",
    "train.max_nonfinite": "this many non-finite steps in a row stop the run",
    "train.progress": "progress bar",
    "checkpoint.every": "steps between checkpoints",
    "checkpoint.keep": "checkpoints kept",
    "checkpoint.async_save": "write checkpoints in the background",
    "checkpoint.restart": "when checkpoints exist but none restores: start over (moving "
    "them aside) instead of refusing",
    "export.hf": "write the policy as a Hugging Face folder at the end",
    "export.dtype": "dtype of the exported weights",
    "export.plot": "write curves.png at the end",
    # -- algorithm sections ----------------------------------------------------------------
    "rounds.num_rounds": "DICE/SPIN: rounds (each samples new pairs from the policy)",
    "rounds.steps_per_round": "DICE/SPIN: optimiser steps per round",
    "rounds.samples_per_prompt": "DICE: samples per prompt ranked into a pair",
    "rounds.length_alpha": "DICE: length regulariser α_L (< 0: grid search)",
    "rounds.mix_gamma": "DICE: share of offline pairs replayed",
    "rounds.rejected_from": "SPIN: 'policy' (the rejected response is a policy sample)",
    "ref_sync.sync_steps": "TR-DPO: steps between reference updates",
    "ref_sync.mixup_alpha": "TR-DPO: reference ← a·θ + (1 − a)·reference (1 = hard copy)",
    "token_weights.transform": "TIS-DPO: binary (= DPO) | rank_based | threshold_and_scale",
    "token_weights.low": "TIS-DPO: lowest weight",
    "token_weights.high": "TIS-DPO: highest weight",
    "token_weights.clamp": "TIS-DPO threshold_and_scale: |d| clamped here",
    "token_weights.source": "TIS-DPO contrastive models: dpo | sft | folders",
    "token_weights.positive": "TIS-DPO source=folders: HF folder of π⁺",
    "token_weights.negative": "TIS-DPO source=folders: HF folder of π⁻",
    "token_weights.steps": "TIS-DPO: steps of each contrastive run (0 = one epoch)",
    "token_weights.learning_rate": "TIS-DPO contrastive runs (0 = optim.learning_rate)",
    "token_weights.beta": "TIS-DPO contrastive DPO runs' β (0 = loss.alpha)",
    "token_weights.cache_dir": "TIS-DPO: '' = $MIPO_JAX_CACHE/tisdpo",
    "mask_net.independent": "SparsePO: separate reward and KL masks",
    "mask_net.dropout": "SparsePO: mask net dropout",
    "mask_net.init_std": "SparsePO: initial weight std of the mask net",
    "prior_model.num_layers": "learnable prior: layers of the prompt-free prior model",
    "prior_model.samples_per_step": "learnable prior: policy samples per step (MI term)",
}

# What users of other trainers type: (the key here, why).
HINTS = {
    "beta": ("loss.alpha", "DPO's β is loss.alpha; KTO's is kto.beta"),
    "learning_rate": ("optim.learning_rate", "the optimiser's settings are under optim"),
    "lr": ("optim.learning_rate", "the optimiser's settings are under optim"),
    "num_train_epochs": ("data.num_epochs", "TRL's num_train_epochs"),
    "max_steps": ("train.num_steps", "TRL's max_steps"),
    "per_device_train_batch_size": ("batch_size", "the batch is global: pairs per step"),
    "gradient_accumulation_steps": ("train.grad_accum", "TRL's gradient_accumulation_steps"),
    "model_name_or_path": ("model.init", "model.init=hf:<folder or hub id>"),
    "loss_type": ("loss.links", "TRL's loss_type is loss.links (with loss.link_weights)"),
    "warmup_steps": ("optim.warmup_steps", "the optimiser's settings are under optim"),
}
MOVED = {
    "data.batch_size": "the batch size is the top-level batch_size (global, pairs per step)",
    "train.eval_split": "evaluation rows: data.eval_split, data.eval_source, data.eval_fraction",
}


def doc(key: str) -> str | None:
    """The documentation of a dotted key (``None`` if undocumented)."""
    if key in DOCS:
        return DOCS[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        star = ".".join(parts[:i]) + ".*"
        if star in DOCS:
            return DOCS[star]
    return None


def leaves(config, prefix: str = "") -> list[tuple[str, object]]:
    """``[(dotted key, value)]`` of every leaf of a config."""
    out = []
    for k in sorted(config.keys()):
        v = config[k]
        if hasattr(v, "items") and not isinstance(v, str):
            out += leaves(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def describe(config) -> str:
    """The resolved config, one ``key = value  # what it means`` line per key."""
    rows = [(k, repr(tuple(v) if isinstance(v, list) else v), doc(k) or "") for k, v in
            leaves(config)]  # fmt: skip
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    lines = []
    for key, value, text in rows:
        left = f"{key} = {value}"
        lines.append(f"{left:<{width}}# {text}" if text else left)
    return "\n".join(lines)


def unknown_key(config, dotted: str) -> str | None:
    """A message for a command-line key the config does not have (None if it has it)."""
    if dotted in MOVED:
        return f"unknown key {dotted}: {MOVED[dotted]}"
    node, path = config, []
    for part in dotted.split("."):
        if hasattr(node, "keys") and part in node.keys():
            node, path = node[part], path + [part]
            continue
        if not hasattr(node, "keys"):
            return f"{'.'.join(path)} is a value, not a section: it has no key {part!r}"
        prefix = ".".join(path) + "." if path else ""
        near = [prefix + n for n in difflib.get_close_matches(part, list(node.keys()), 3, 0.6)]
        elsewhere = [k for k, _ in leaves(config) if k.rsplit(".", 1)[-1] == part]
        hint = HINTS.get(part)
        guesses = ([hint[0]] if hint else []) + [k for k in near + elsewhere if not hint
                                                 or k != hint[0]]  # fmt: skip
        msg = f"unknown key {dotted}"
        if guesses:
            msg += "; did you mean " + " or ".join(dict.fromkeys(guesses)) + "?"
        if hint:
            msg += f" ({hint[1]})"
        end = " " if msg.endswith("?") else ". "
        return msg + end + "Add --print_config to list every key."
    return None
