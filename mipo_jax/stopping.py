"""Stopping a job on SIGTERM (preemption) or SIGINT (Ctrl-C) without losing work.

Between training steps `mipo_jax.checkpoint.PreemptionGuard` turns either signal into a flag:
the loop stops at the next step, saves a checkpoint and returns ``{"stopped": reason}``.
Everywhere else in a job (start-up, data loading, compiling, the evaluation and export after
the last save) there is nothing new to save, so `job_signals` makes the signal raise
`Interrupted`, which `mipo_jax.train.stages.run` (and the command, before that) turn into a
clean stop. A job stopped by SIGTERM returns a ``stopped`` summary; one stopped by SIGINT
raises ``KeyboardInterrupt`` once it has saved, as Python code interrupted by Ctrl-C does (a
loop over runs stops too). Exit codes of the command: 0 after SIGTERM, 130 after SIGINT (as
shells expect of Ctrl-C, so that ``a && b`` stops), with no traceback.

Several processes (`jax.distributed`): JAX's preemption service owns SIGTERM (it agrees on
a step at which every process stops) and SIGINT keeps Python's default, since one process
cannot stop the others; nothing is installed here for them.

This module imports no JAX at the top: the command installs the handlers before JAX starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger("mipo_jax")

REASONS = {signal.SIGTERM: "preempted", signal.SIGINT: "interrupted"}
EXIT_CODES = {"preempted": 0, "interrupted": 130}


class Interrupted(BaseException):  # noqa: N818  (like KeyboardInterrupt: not an Exception)
    """A stop signal outside the training steps. A BaseException, so ``except Exception``
    blocks (e.g. the checkpoint fallbacks) do not take it for an error of their own."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.reason = REASONS.get(signum, "preempted")


def multiprocess() -> bool:
    """Whether `jax.distributed` is running (without starting JAX's backend)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def preemption_service() -> bool:
    """JAX's preemption service (and its SIGTERM listener) runs: several processes."""
    import jax

    return multiprocess() and bool(jax.config.jax_enable_preemption_service)


def handled_signals() -> tuple[int, ...]:
    """The signals this process turns into a clean stop: SIGTERM and SIGINT in one process;
    with several, SIGTERM only where JAX's preemption service does not own it."""
    if multiprocess():
        return () if preemption_service() else (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


_RECEIVED: list[int] = []  # every signal `job_signals` turned into `Interrupted`
_PENDING: list[int] = []  # raised, and not yet seen handled by the job (`take_pending`)
_ACTIVE: list[bool] = []  # one entry per active `job_signals`
RETRY_S = 0.05


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import (an exception raised there can abort the
    process: a C extension half-initialised)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _resend(signum: int) -> None:
    if _ACTIVE:  # still in a job: otherwise the default action would end the process
        os.kill(os.getpid(), signum)


def _raise(signum, frame):
    _RECEIVED.append(signum)
    if _importing(frame):  # raise it once the import is done: the signal comes again
        threading.Timer(RETRY_S, _resend, (signum,)).start()
        return
    _PENDING.append(signum)
    raise Interrupted(signum)


def take_pending() -> int | None:
    """A signal whose `Interrupted` the job has not handled, if any (then forgotten).

    Python ignores exceptions raised where nothing can catch them (a garbage-collection
    callback, ``__del__``), so a signal arriving there would be lost; the job polls this
    where it can stop cleanly (`check`, `mipo_jax.checkpoint.PreemptionGuard`)."""
    signum = _PENDING[-1] if _PENDING and _ACTIVE else None
    _PENDING.clear()
    return signum


def check() -> None:
    """Raise `Interrupted` now for a signal whose first `Interrupted` was lost."""
    signum = take_pending()
    if signum is not None:
        raise Interrupted(signum)


def _stop_of(error: BaseException, mark: int) -> Interrupted | None:
    seen = error
    while seen is not None and not isinstance(seen, Interrupted):
        seen = seen.__cause__ or seen.__context__
    if seen is None and len(_RECEIVED) > mark:
        seen = Interrupted(_RECEIVED[-1])
    if seen is not None:
        _PENDING.clear()  # handled
    return seen


@contextlib.contextmanager
def job_signals():
    """While active (main thread only), the handled signals raise `Interrupted`.

    Yields ``stop_of(error)``: the `Interrupted` behind an error, or None. An `Interrupted`
    raised inside code that catches and re-raises as another error still means "stop": any
    error after a signal arrived is the stop. A signal that arrives during an import is
    raised once the import is done (raising inside a C extension's initialisation can abort
    the process); one whose `Interrupted` Python ignored is taken up where the job polls
    (`take_pending`).
    """
    mark = len(_RECEIVED)
    if not _ACTIVE:
        _PENDING.clear()
    stop_of = lambda error: _stop_of(error, mark)
    if threading.current_thread() is not threading.main_thread():
        yield stop_of
        return
    previous = {s: signal.signal(s, _raise) for s in handled_signals()}
    hook = sys.unraisablehook

    def quiet(unraisable):  # an ignored Interrupted is pending, not an error to print
        if not isinstance(unraisable.exc_value, Interrupted):
            hook(unraisable)

    sys.unraisablehook = quiet
    _ACTIVE.append(True)
    try:
        yield stop_of
    finally:
        _ACTIVE.pop()
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def stoppable(run) -> None:
    """Call ``run()`` (the command: flag parsing included) with `job_signals`. A signal that
    reaches this level (before the job started) exits 0 (SIGTERM) or 130 (SIGINT) with one
    line and no traceback; so does the ``KeyboardInterrupt`` a job raises after saving on
    SIGINT (`mipo_jax.train.stages.run`). A job stopped by SIGTERM returns: exit code 0."""
    with job_signals() as stop_of:
        try:
            run()
        except KeyboardInterrupt as interrupt:
            print(f"interrupted: {interrupt}", file=sys.stderr)
            sys.exit(EXIT_CODES["interrupted"])
        except BaseException as error:  # SystemExit too: absl's app.run ends with one
            stop = None if isinstance(error, SystemExit) else stop_of(error)
            if stop is None:
                raise
            print(f"stopped ({stop}) before the job started; nothing to save", file=sys.stderr)
            sys.exit(EXIT_CODES[stop.reason])
