"""SIGTERM/SIGINT stop a run cleanly (fedmrg.signals) and its MLflow runs end KILLED.

Without Ray: the signal handling in this process, and `end_runs` / `RunTracker` on a real
sqlite MLflow store. The end-to-end case (a `fedmrg run` subprocess stopped by SIGTERM, then
resumed) is in test_stop_run.py.
"""

from __future__ import annotations

import os
import pickle
import signal
import time

import pytest
from helpers import start
from mlflow import MlflowClient

from fedmrg.signals import RunInterrupted, StopOnSignals, as_run_interrupted
from fedmrg.tracking import TrackingError, end_runs


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raises_run_interrupted_with_the_shell_exit_code(signum, code):
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as caught, StopOnSignals() as stop:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at once and raises out of the sleep
        pytest.fail("no RunInterrupted")
    assert caught.value.signum == signum and caught.value.exit_code == code
    assert isinstance(caught.value, KeyboardInterrupt)  # `except Exception` lets it through
    assert stop.received == signum
    assert signal.getsignal(signum) is before  # the previous handler is back
    again = pickle.loads(pickle.dumps(RunInterrupted(signum, "r1")))
    assert (again.signum, again.run_name, again.exit_code) == (signum, "r1", code)


def test_a_second_signal_during_the_cleanup_is_ignored(caplog):
    cleaned = False
    with pytest.raises(RunInterrupted), StopOnSignals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # e.g. `ray job stop` reaching every process
            time.sleep(0.2)  # the handler runs (and returns) here
            cleaned = True
    assert cleaned
    assert "SIGINT received while stopping after SIGTERM" in caplog.text


def test_reinstall_after_another_handler_took_over():
    """`ray.init` replaces SIGTERM's handler: `install()` takes it back; exit restores the
    one from before the block."""
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignals() as stop:
        signal.signal(signal.SIGTERM, lambda *_: None)  # what ray.init does
        stop.install()
        with pytest.raises(RunInterrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_end_runs_ends_only_running_runs(store, dataset_root):  # noqa: F811
    client = MlflowClient(store["tracking_uri"])
    tracker = start(store, dataset_root, run_name="stopped")
    finished = start(store, dataset_root, run_name="done")
    finished.finish()
    ids = [*tracker.center_run_ids.values(), tracker.run_id]
    ended = end_runs(store["tracking_uri"], [*ids, finished.run_id], "KILLED",
                     "driver stopped: stopped by SIGTERM")
    assert ended == ids
    for run_id in ids:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags["fedmrg.end_reason"] == "driver stopped: stopped by SIGTERM"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
    assert end_runs(store["tracking_uri"], ids, "KILLED") == []  # already ended
    with pytest.raises(TrackingError, match="not one of"):
        end_runs(store["tracking_uri"], ids, "STOPPED")


def test_tracker_block_ends_killed_on_a_signal_and_failed_on_an_error(store,  # noqa: F811
                                                                      dataset_root):  # noqa: F811
    client = MlflowClient(store["tracking_uri"])
    with pytest.raises(RunInterrupted), start(store, dataset_root, run_name="sig") as stopped:
        raise RunInterrupted(signal.SIGTERM)
    with pytest.raises(ValueError), start(store, dataset_root, run_name="err") as failed:
        raise ValueError("boom")
    for tracker, status in ((stopped, "KILLED"), (failed, "FAILED")):
        for run_id in [tracker.run_id, *tracker.center_run_ids.values()]:
            assert client.get_run(run_id).info.status == status


def test_a_bare_keyboard_interrupt_stands_for_the_signal_caught():
    """Ray's `ray.get`/`ray.wait` raise a new KeyboardInterrupt instead of the handler's."""
    assert type(as_run_interrupted(KeyboardInterrupt())) is KeyboardInterrupt
    error = ValueError("x")
    assert as_run_interrupted(error) is error
    with pytest.raises(RunInterrupted), StopOnSignals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except RunInterrupted:
            converted = as_run_interrupted(KeyboardInterrupt())
            assert isinstance(converted, RunInterrupted) and converted.exit_code == 143
            raise
    assert type(as_run_interrupted(KeyboardInterrupt())) is KeyboardInterrupt  # block closed
