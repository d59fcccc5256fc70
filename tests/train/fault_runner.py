"""`python -m mipo_jax.main` with hooks for the fault-injection tests (test_faults.py).

    MIPO_FAULTS='{"step": 0.25, "save": 1.0, "eval": 0.5, "export": 0.8, "plot": 0.5}' \
        python -m tests.train.fault_runner --config=configs/dpo.py:tiny --workdir=W ...

Runs the command exactly as ``python -m mipo_jax.main`` does, after wrapping a few functions so
that each prints a marker line (``FAULT <what> <step>``, flushed) and then sleeps the given
seconds: a test waits for a marker and sends its signal at a random moment inside the window.
The sleeps change no computed value. ``"hold": marker`` makes that one marker's sleep
``"hold_s"`` long instead, so that a test's signal sent a little after it surely lands inside
that phase, however late the test reads the marker. Markers:

  start            before flags are parsed (the process is importing, nothing built yet)
  dispatch <s>     the host is about to run step s (the first one compiles the step)
  step <s>         step s was dispatched, before the periodic work (eval, checkpoint)
  save <s>         an asynchronous checkpoint save of step s is written, not yet committed
  eval <s>         an evaluation of the state after step s starts
  export           the HF export starts (before the weights file is written)
  plot             the PNG plot starts (the last thing before summary.json)

``"enospc": s`` makes the commit of step s's checkpoint fail with ENOSPC (a full disk),
for machines where the test cannot mount a small tmpfs.
"""

import asyncio
import errno
import functools
import json
import os
import time


def _marker(text: str) -> None:
    print(f"FAULT {text}", flush=True)


def _install(faults: dict) -> None:
    from orbax.checkpoint._src.path import atomicity

    from mipo_jax.hf import export
    from mipo_jax.train import evaluation, loop

    def pause(key: str, marker: str) -> float:
        _marker(marker)
        if faults.get("hold") == marker:
            return float(faults.get("hold_s", 60.0))
        return float(faults.get(key, 0.0))

    def wait(key: str, marker: str) -> None:
        time.sleep(pause(key, marker))

    build = loop.build

    @functools.wraps(build)
    def build_marked(*args, **kwargs):
        import dataclasses

        run, state = build(*args, **kwargs)
        step_fn = run.step_fn

        def step_marked(state, batch, reference):
            _marker(f"dispatch {int(state.step) + 1}")
            return step_fn(state, batch, reference)

        return dataclasses.replace(run, step_fn=step_marked), state

    loop.build = build_marked

    hooks_run = loop.Hooks.run

    def hooks_marked(self, step, state):
        wait("step", f"step {step}")
        return hooks_run(self, step, state)

    loop.Hooks.run = hooks_marked

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_marked(self):
        name = self.get().name.split(".")[0]
        if not name.isdigit():  # an item of the step (state, config, ...), not the step
            return await finalize(self)
        step = int(name)
        seconds = pause("save", f"save {step}")
        if faults.get("enospc") == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
        await asyncio.sleep(seconds)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_marked

    evaluate = evaluation.Evaluator.__call__

    def evaluate_marked(self, state):
        wait("eval", f"eval {int(state.step)}")
        return evaluate(self, state)

    evaluation.Evaluator.__call__ = evaluate_marked

    write = export.write_safetensors

    def write_marked(path, tensors):
        wait("export", "export")
        return write(path, tensors)

    export.write_safetensors = write_marked

    plot = loop.plot

    def plot_marked(*args, **kwargs):
        wait("plot", "plot")
        return plot(*args, **kwargs)

    loop.plot = plot_marked


def main() -> None:
    from mipo_jax import stopping

    def run():
        from absl import app

        from mipo_jax import main as command

        _install(json.loads(os.environ.get("MIPO_FAULTS", "{}")))
        app.run(command.main)

    _marker("start")
    stopping.stoppable(run)  # as `python -m mipo_jax.main` does, around its imports too


if __name__ == "__main__":
    main()
