"""Train a preference-optimisation algorithm from a config file.

  python -m mipo_jax.main --config=configs/<algorithm>.py[:arg] --workdir=DIR \
      [--config.key=value ...]
  python -m mipo_jax.main --config=configs/<algorithm>.py[:arg] --print_config

``configs/<algorithm>.py`` has ``get_config(arg)``; ``:tiny`` gives a seconds-long smoke run.
Any config key can be overridden on the command line (``--config.optim.learning_rate=1e-5``,
``--config.model.init=hf:/path/to/model``, ``--config.data.source=my_pairs.jsonl``);
``--print_config`` lists every key with its value and meaning. Running again with the same
workdir resumes from its newest checkpoint. The workdir receives metrics.jsonl, TensorBoard
events, checkpoints/, export/ (an HF folder), curves.png and summary.json. A mistake in the
config, the data or a path is one line and exit code 2 (``--debug``: the traceback).
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from mipo_jax import cli, paths, stopping

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config: configs/<algorithm>.py[:arg], e.g. configs/dpo.py:tiny. "
    "Override any key with --config.<key>=<value>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: metrics, checkpoints (resumed from), export, plot."
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config, every key with its meaning, and exit."
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of config, data and path errors.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0 (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and friends: warnings only
    logging.getLogger("mipo_jax").setLevel(logging.INFO)
    with cli.user_errors(_DEBUG.value):
        config = _CONFIG.value
        if _PRINT_CONFIG.value:
            from mipo_jax.config_docs import describe

            print(describe(config))
            return
        if not _WORKDIR.value:
            raise ValueError("--workdir is required: the run directory (resumed if it exists)")
        from mipo_jax.train import checks

        checks.validate(config)  # before JAX starts, data loads or anything compiles
        from mipo_jax import compile_cache, distributed

        compile_cache.enable()  # later runs of the same model and shapes skip compiling

        distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        import jax

        jax.config.update("jax_threefry_partitionable", True)
        from mipo_jax.train import stages

        summary = stages.run(config, paths.resolve(_WORKDIR.value))
        if jax.process_index() == 0:
            print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    # SIGTERM/SIGINT: save, or exit cleanly; mistakes: one line, exit 2
    stopping.stoppable(lambda: app.run(main, flags_parser=cli.parse_flags))
