"""Preemption: SIGTERM (and SIGINT) between training steps become a flag the loop polls.

    with PreemptionGuard() as guard:
        while step < total:
            state, metrics = train_step(state, next(data))
            step += 1
            ckpt.save(step, state, data_iter=data.get_state())         # periodic, async
            if guard.should_stop(step):
                break
        ckpt.save(step, state, data_iter=data.get_state(), force=True, wait=True)
    # main returns normally: exit code 0 (130 after SIGINT: `mipo_jax.stopping`)

One process: the handler only sets a flag (no I/O in signal context); `should_stop` reads it;
``guard.reason`` is ``preempted`` (SIGTERM) or ``interrupted`` (SIGINT). A second signal while
stopping is ignored (the save goes on; checkpoints are written atomically, so kill -9 is safe
too). Outside the steps, `mipo_jax.stopping.job_signals` handles the signals.

Several processes (`jax.distributed`): JAX's preemption service already owns SIGTERM and
agrees on a step at which *every* process stops (the next step after the furthest one when the
notice arrived), so `should_stop(step)` asks `multihost_utils.reached_preemption_sync_point`
and the guard installs no handler of its own (nor one for SIGINT: one process cannot stop
the others). Call `should_stop` at every step with the same step number on all processes.
"""

from __future__ import annotations

import logging
import signal
import threading

from jax.experimental import multihost_utils

from mipo_jax.stopping import REASONS, handled_signals, preemption_service, take_pending

logger = logging.getLogger("mipo_jax.checkpoint")


class PreemptionGuard:
    """Context manager: while active, `signals` (default SIGTERM and SIGINT) request a clean
    stop instead of ending the process."""

    def __init__(self, signals: tuple[int, ...] | None = None):
        self._signals = signals
        self._stop = threading.Event()
        self._previous: dict[int, object] = {}
        self._multiprocess = False
        self._reported = False
        self.signal_number: int | None = None

    def __enter__(self) -> PreemptionGuard:
        pending = take_pending()  # a stop signal before the steps that Python ignored
        if pending is not None:
            self.signal_number = pending
            self._stop.set()
        self._multiprocess = preemption_service()
        signals = self._signals if self._signals is not None else handled_signals()
        if not self._multiprocess:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("PreemptionGuard must be entered on the main thread")
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._stop.is_set():
            return  # a second signal while stopping: the save goes on (kill -9 is safe too)
        self.signal_number = signum
        self._stop.set()

    def request_stop(self) -> None:
        """Ask for a stop as a signal would (in multi-process runs: call it on every process)."""
        self._stop.set()

    @property
    def requested(self) -> bool:
        """A stop was requested in this process (no collective: use between steps only when
        a single process runs, or after the loop)."""
        return self._stop.is_set()

    @property
    def reason(self) -> str:
        """``interrupted`` after SIGINT, else ``preempted`` (SIGTERM, JAX's preemption notice)."""
        return REASONS.get(self.signal_number, "preempted")

    def should_stop(self, step: int | None = None) -> bool:
        """True once a stop was requested (multi-process: at the agreed step, on all)."""
        stop = self._stop.is_set()
        if self._multiprocess and not stop:
            if step is None:
                raise ValueError("should_stop needs the step number in multi-process runs")
            stop = multihost_utils.reached_preemption_sync_point(step)
        if stop and not self._reported:
            self._reported = True
            why = signal.Signals(self.signal_number).name if self.signal_number else "preemption"
            logger.warning("Stopping at step %s (%s): saving a checkpoint and exiting", step, why)
        return stop
