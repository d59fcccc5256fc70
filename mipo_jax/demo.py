"""``make demo``: the main job on the embedded controlled task, with a readable summary.

  python -m mipo_jax.demo [--workdir=DIR] [--config.key=value ...]

Runs ``configs/default.py``: a tiny Llama-family model is fine-tuned on the task's
generating distribution (that SFT model is the reference), then trained with MI-DPO
(prior: the reference) on pairs labelled by the task's known reward. Prints the true reward
before and after, the exact KL to the reference, the held-out preference accuracy, and where
the metrics, plot, checkpoints and exported model are. A new run directory is made under
``runs/`` unless ``--workdir`` is given (an existing one is resumed).
"""

import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

from mipo_jax import cli, paths, stopping

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(_HERE), "configs", "default.py"),
    "Config file (default: configs/default.py).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/demo-<time>).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of config, data and path errors.")


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _tied(metrics: dict) -> bool:
    return abs(metrics.get("rewards/margins", 1.0)) < 1e-6


def report(summary: dict, baselines: dict | None) -> str:
    before, after = summary["eval_before"] or {}, summary["eval_after"] or {}
    lines = [
        "",
        "=" * 72,
        f"MI-DPO demo ({summary['algorithm']}, prior: reference) finished in "
        f"{summary['seconds']:.0f} s, {summary['steps']} steps",
        "-" * 72,
        f"true reward E[r]         before {_fmt(before.get('true/reward'))}   "
        f"after {_fmt(after.get('true/reward'))}",
    ]
    if baselines:
        lines.append(
            f"   (task's π_ref {_fmt(baselines['task_ref_reward'])}; KL-regularised optimum at "
            f"β={baselines['beta']:g}: {_fmt(baselines['optimum_reward'])}, "
            f"KL {_fmt(baselines['optimum_kl'], '.3f')} to the task's π_ref)"
        )
    lines += [
        f"KL(π ‖ π_ref), exact      before {_fmt(before.get('true/kl_ref'), '.4f')}   "
        f"after {_fmt(after.get('true/kl_ref'), '.4f')}",
        f"held-out pref. accuracy  before {_fmt(before.get('rewards/accuracies'))}   "
        f"after {_fmt(after.get('rewards/accuracies'))}"
        + ("   (before: policy = reference, every reward ties at 0)" if _tied(before) else ""),
        f"held-out loss            before {_fmt(before.get('loss'), '.4f')}   "
        f"after {_fmt(after.get('loss'), '.4f')}",
        "-" * 72,
        f"reference      {summary['reference']['source']}",
        f"metrics        {summary['metrics']}  (TensorBoard: {summary['tensorboard']})",
        f"plot           {summary['plot']}",
        f"checkpoints    {summary['checkpoints']}",
        f"exported model {summary['export']}  (transformers: AutoModelForCausalLM.from_pretrained)",
        "=" * 72,
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mipo_jax").setLevel(logging.INFO)
    with cli.user_errors(_DEBUG.value):
        config = _CONFIG.value
        from mipo_jax.train import checks

        checks.validate(config)
        from mipo_jax import compile_cache

        compile_cache.enable()  # a second demo skips most of the compiling
        workdir = _WORKDIR.value or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
        from mipo_jax.train import stages

        summary = stages.run(config, paths.resolve(workdir))
    if summary.get("stopped"):
        stage = summary.get("stage", "main")
        print(f"stopped ({summary['stopped']}) in the {stage} stage; run again to resume")
        return
    baselines = None
    from mipo_jax.train import task_eval

    if config.data.source in task_eval.TASKS:
        from mipo_jax.data.embedded import load_tokenizer
        from mipo_jax.data.pipeline import tokenizer_name

        tok = load_tokenizer(tokenizer_name(config.data))
        ev = task_eval.TaskEval(config.data.source, tok, config.train.task_eval_prompts)
        baselines = {**ev.baselines(config.loss.alpha), "beta": config.loss.alpha}
    print(report(summary, baselines))


if __name__ == "__main__":
    stopping.stoppable(lambda: app.run(main, flags_parser=cli.parse_flags))
