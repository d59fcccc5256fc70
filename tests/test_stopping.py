"""SIGTERM/SIGINT outside the training steps: `Interrupted`, also behind errors it caused."""

import os
import signal
import sys
import time

import pytest

from mipo_jax import stopping


def _handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_raises_interrupted_and_the_command_exits_cleanly(signum, code, capsys):
    before = _handlers()
    with stopping.job_signals() as stop_of:
        with pytest.raises(stopping.Interrupted) as err:
            os.kill(os.getpid(), signum)
        assert stop_of(err.value) is err.value and err.value.reason in ("preempted", "interrupted")
    assert _handlers() == before

    def run():
        os.kill(os.getpid(), signum)

    with pytest.raises(SystemExit) as exit_:
        stopping.stoppable(run)
    assert exit_.value.code == code and "before the job started" in capsys.readouterr().err
    assert _handlers() == before


def test_an_error_caused_by_the_signal_is_the_stop():
    def import_something():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as e:  # as an extension module's import reports it
            raise ImportError("failed to import") from e

    with stopping.job_signals() as stop_of:
        with pytest.raises(ImportError) as err:
            import_something()
        assert isinstance(stop_of(err.value), stopping.Interrupted)
        assert stop_of(ValueError("unrelated")).signum == signal.SIGTERM  # a signal came
    with stopping.job_signals() as stop_of:
        assert stop_of(ValueError("unrelated")) is None  # no signal in this job


def test_the_command_exits_130_after_a_job_interrupted_by_sigint(capsys):
    def job():
        interrupt = KeyboardInterrupt("stopped by SIGINT: {'step': 3}")
        raise interrupt

    with pytest.raises(SystemExit) as exit_:
        stopping.stoppable(job)
    assert exit_.value.code == 130 and "interrupted: stopped by SIGINT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        stopping.stoppable(lambda: (_ for _ in ()).throw(SystemExit(3)))
    assert exit_.value.code == 3  # the command's own exit passes through


def test_a_signal_during_an_import_is_raised_after_it(tmp_path, monkeypatch):
    # raising inside a C extension's initialisation can abort the process: wait for the end
    body = "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nDONE = True\n"
    (tmp_path / "signalled_module.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with stopping.job_signals() as stop_of:
        with pytest.raises(stopping.Interrupted) as err:
            import signalled_module  # noqa: F401

            assert sys.modules["signalled_module"].DONE  # the import ran to its end
            time.sleep(10)  # the signal comes again (after RETRY_S) and interrupts this
        assert stop_of(err.value) is err.value
    assert sys.modules["signalled_module"].DONE


class _SignalInDel:
    """Sends SIGTERM from ``__del__``, where Python prints and ignores any exception (as in
    the garbage-collection callbacks JAX registers)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_whose_exception_python_ignored_stops_the_job_later(capsys):
    from mipo_jax.checkpoint import PreemptionGuard

    with stopping.job_signals():
        _SignalInDel()  # the Interrupted raised in __del__ is lost
        with pytest.raises(stopping.Interrupted):
            stopping.check()  # where the job can stop: between stages, before the final eval
        stopping.check()  # taken up once
        _SignalInDel()
        with PreemptionGuard() as guard:  # the training loop: stop before the first step
            assert guard.requested and guard.reason == "preempted"
    assert "Exception ignored" not in capsys.readouterr().err  # not reported as an error
