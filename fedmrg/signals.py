"""Stopping a run cleanly on SIGTERM and SIGINT (`ray job stop`, Ctrl-C, a scheduler's kill).

`StopOnSignals` turns the first SIGTERM or SIGINT in the main thread into `RunInterrupted`
(a `KeyboardInterrupt`, so library code that catches `Exception` lets it through), raised
wherever the driver is: waiting on the coordinator actor, or inside the coordinator itself
when it runs in process. What unwinds then ends the MLflow runs as KILLED (`RunTracker`'s
context manager in process; `run_in_coordinator_actor` asks the coordinator actor to end them
before killing it) and stops the client actors without their graceful close. The last round's
checkpoint was written atomically when the round ended, so `fedmrg run --resume RUN`
continues from it.

A second signal while that cleanup runs is ignored (logged): `ray job stop` sends SIGTERM to
every process of the job, then SIGKILL after `RAY_JOB_STOP_WAIT_TIME_S` (3 s by default), and
the cleanup must not be cut short by a repeated signal before that.

The process then exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), the
shell's convention for a process ended by a signal.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # signals caught by the open StopOnSignals blocks, in order


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal; `exit_code` is 128 + its number. `run_name` is set by
    `Experiment.fit` once it knows which run was stopped (to say how to resume it)."""

    def __init__(self, signum: int, run_name: str | None = None):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.run_name = run_name

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):  # picklable (Ray may carry it between processes)
        return (RunInterrupted, (self.signum, self.run_name))


def as_run_interrupted(error: BaseException) -> BaseException:
    """`error`, or `RunInterrupted` when it is a bare `KeyboardInterrupt` standing for a signal
    an open `StopOnSignals` caught: Ray's `ray.get`/`ray.wait` raise a new KeyboardInterrupt
    in place of the exception the handler raised."""
    if (isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted)
            and _received):
        return RunInterrupted(_received[-1])
    return error


class StopOnSignals:
    """Context manager: SIGTERM/SIGINT raise `RunInterrupted` in the main thread while it is
    open (module docstring); the previous handlers come back on exit. Off the main thread
    (where Python cannot install handlers) it does nothing.

    `install()` installs the handlers again: `ray.init` replaces the SIGTERM handler of the
    process that calls it, so `Experiment.fit` calls it after connecting to Ray."""

    def __init__(self, signums: Sequence[int] = STOP_SIGNALS):
        self.signums = tuple(signums)
        self.received: int | None = None  # the first signal caught
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            log.warning("%s received while stopping after %s; still ending the run",
                        signal.Signals(signum).name, signal.Signals(self.received).name)
            return
        self.received = signum
        _received.append(signum)
        raise RunInterrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signums:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def __enter__(self) -> StopOnSignals:
        self.install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.received is not None:
            _received.remove(self.received)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
