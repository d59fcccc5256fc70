"""A training job as stages, each an ordinary run of the loop with its own workdir.

    summary = run(config, workdir)      # what `python -m mipo_jax.main` and `mipo_jax.run` do

1. ``sft`` (when ``sft.steps > 0``): supervised fine-tuning of the starting model, whose
   result is the policy's start and the reference. The trainer's ``sft`` objective (the
   token-mean NLL) in ``<workdir>/sft``, on draws from the task's generating distribution
   for the embedded controlled tasks, else on the training split's chosen responses.
2. TIS-DPO's contrastive models π⁺ and π⁻ (``token_weights`` with a non-binary transform):
   two runs from the reference, cached by a content hash (`mipo_jax.train.token_weights`),
   or two given folders.
3. the main run, in ``<workdir>``.

Every stage checkpoints and resumes on its own: running the same command again skips the
finished stages (their ``summary.json`` exists) and resumes the interrupted one. SIGTERM or
SIGINT stops the job in any stage (`mipo_jax.stopping`): between steps the stage saves a
checkpoint first; elsewhere (start-up, evaluation, export) there is nothing new to save. The
summary then says ``stopped`` (``preempted`` or ``interrupted``), the ``stage`` and the
``step`` (None outside the steps).
"""

import logging

import jax
import ml_collections as mlc
import numpy as np

from mipo_jax import paths
from mipo_jax.data.tasks import sentiment
from mipo_jax.losses import loss_config
from mipo_jax.stopping import check, job_signals
from mipo_jax.train import loop, modules, setup, task_eval
from mipo_jax.train import token_weights as tw
from mipo_jax.train.data import StepData, tokenizer_spec

log = logging.getLogger("mipo_jax.train")


def run(config, workdir: str, *, train_data=None, eval_data=None) -> dict:
    """Every stage the config asks for, then the main run; returns the main run's summary
    (plus ``stages``: where each earlier stage lives), or after SIGTERM a ``stopped``
    summary. After SIGINT (Ctrl-C) it saves the same way, then raises ``KeyboardInterrupt``
    (as Python code interrupted by Ctrl-C does; its ``summary`` attribute is that summary).

    ``train_data``/``eval_data``: in-memory data instead of ``data.source``/``eval_source``
    (`mipo_jax.train.setup.build`).
    """
    data = dict(train_data=train_data, eval_data=eval_data)
    where = {"stage": "main"}
    with job_signals() as stop_of:
        try:
            summary = _run(config, workdir, where, data)
        except BaseException as error:
            stop = stop_of(error)
            if stop is None:
                raise
            log.warning(
                "stopped (%s) in the %s stage outside its training steps (start-up, evaluation "
                "or export): nothing new to save; run the same command again to continue",
                stop, where["stage"],
            )  # fmt: skip
            summary = {"stopped": stop.reason, "stage": where["stage"], "step": None}
    if summary.get("stopped") == "interrupted":
        interrupt = KeyboardInterrupt(f"stopped by SIGINT: {summary}")
        interrupt.summary = summary
        raise interrupt
    return summary


def _run(config, workdir: str, where: dict, data: dict) -> dict:
    stages: dict[str, dict] = {}
    init = None
    if config.sft.steps:
        where["stage"] = "sft"
        check()
        done = sft_stage(config, workdir, train_data=data["train_data"])
        if done.get("stopped"):
            return {**done, "stage": "sft"}
        init = f"hf:{done['export']}"
        stages["sft"] = {"workdir": sft_dir(workdir), "export": done["export"]}
    token_models = None
    if "token_weights" in config and config.token_weights.transform != "binary":
        where["stage"] = "tisdpo"
        check()
        done = contrastive_stage(config, init, where, train_data=data["train_data"])
        if done.get("stopped"):
            return done
        token_models = done["folders"]
        stages["tisdpo"] = done
    where["stage"] = "main"
    check()  # a signal Python ignored (`mipo_jax.stopping.take_pending`) stops here
    summary = loop.train(config, workdir, init=init, token_models=token_models, **data)
    if summary.get("stopped"):
        return {**summary, "stage": "main"}
    if stages:
        summary["stages"] = stages
        summary["sft_export"] = stages.get("sft", {}).get("export")
    return summary


# ---- SFT ---------------------------------------------------------------------------------


def sft_dir(workdir: str) -> str:
    return paths.join(workdir, "sft")


def sft_config(config) -> mlc.ConfigDict:
    """The SFT stage's config: the ``sft`` objective with the ``sft`` section's settings."""
    s = config.sft
    sub = mlc.ConfigDict(config.to_dict())
    for section in ("token_weights", "ref_sync", "rounds", "prior_model", "mask_net", "kto"):
        if section in sub:
            del sub[section]
    sub.algorithm = f"{config.algorithm}/sft"
    sub.objective = "sft"
    sub.loss = loss_config("reference")  # not read by the sft objective
    sub.batch_size = int(s.batch_size)
    sub.optim = mlc.ConfigDict(
        dict(name="adamw", learning_rate=float(s.learning_rate), warmup_steps=int(s.warmup_steps),
             schedule="cosine", end_factor=0.1, clip_norm=1.0, weight_decay=0.0)
    )  # fmt: skip
    sub.sft.steps = 0
    sub.train.update(dict(num_steps=int(s.steps), grad_accum=1, eval_batches=0, eval_every=0,
                          task_eval_prompts=0))  # fmt: skip
    sub.data.update(dict(layout="padded", row_length=None, completion_width=None,
                         bucket_window=0, seed=int(config.seed)))  # fmt: skip
    if config.data.source in task_eval.TASKS:  # draws are whole sequences: no truncation
        sub.data.update(dict(max_length=None, max_prompt_length=None, max_completion_length=None))
        sub.data.tokenizer = tokenizer_spec(config)[0]  # the draws come as in-memory rows
    sub.export.update(dict(hf=True, plot=False, dtype="float32"))
    return sub


def task_draws(task: str, n: int, seed: int) -> list[dict]:
    """``n`` (prompt, completion) draws from the controlled task's generating distribution."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = sentiment.PROMPT_WORDS
        prompt = tuple(int(w) for w in rng.integers(0, len(sentiment.WORDS), rng.choice(words)))
        y = sentiment.sample_completion(rng, task, prompt)
        out.append(
            {"prompt": sentiment.text(prompt), "completion": " " + sentiment.text(y), "label": True}
        )
    return out


def sft_stage(config, workdir: str, *, train_data=None) -> dict:
    """Run (or reuse) the SFT stage; ``{"export": folder}`` or a ``stopped`` summary."""
    folder = sft_dir(workdir)
    export = paths.join(folder, "export")
    if paths.exists(paths.join(folder, "summary.json")):
        log.info("SFT stage: done, reusing %s", export)
        return {"export": export}
    sub = sft_config(config)
    task = task_eval.TASKS.get(config.data.source) if train_data is None else None
    if task is not None:
        n = min(int(config.sft.steps) * int(config.sft.batch_size), 200_000)
        train_data = task_draws(task, n, int(config.seed) + 17)
    log.info("SFT stage: %d steps in %s", int(config.sft.steps), folder)
    summary = loop.train(sub, folder, train_data=train_data)
    if summary.get("stopped"):
        return summary
    return {"export": export}


# ---- TIS-DPO's contrastive models --------------------------------------------------------


def contrastive_stage(config, init: str | None, where: dict | None = None, *, train_data=None):
    """π⁺ and π⁻: ``{"folders": (positive, negative), ...}`` or a ``stopped`` summary
    (``where["stage"]`` names the run in progress)."""
    where = {} if where is None else where
    t = config.token_weights
    if t.source == "folders":
        return {"folders": (t.positive, t.negative)}
    mesh = setup.mesh_of(config)
    train = StepData(config, "train", train_data=train_data)
    reference = modules.build_policy(config.model, train.tokenizer, mesh, config.seed, init)
    key, subs = tw.contrastive_runs(config, reference, train)
    del reference, train
    root = paths.join(tw.cache_root(config), key)
    folders, trained = [], []
    for side, sub in zip(tw.SIDES, subs, strict=True):
        workdir = paths.join(root, side)
        where["stage"] = f"tisdpo-{side}"
        if paths.exists(paths.join(workdir, "summary.json")):
            log.info("TIS-DPO %s model: cache hit %s", side, workdir)
        else:
            log.info(
                "TIS-DPO %s model: cache miss, %s for %d steps from the reference in %s",
                side, t.source, int(sub.train.num_steps), workdir,
            )  # fmt: skip
            summary = loop.train(sub, workdir, init=init, train_data=train_data)
            if summary.get("stopped"):
                return {**summary, "stage": f"tisdpo-{side}"}
            if jax.process_index() == 0:  # the finished run's optimiser state is not needed
                paths.rmtree(paths.join(workdir, "checkpoints"))
            trained.append(side)
        folders.append(paths.join(workdir, "export"))
    return {"folders": tuple(folders), "key": key, "trained": trained}
