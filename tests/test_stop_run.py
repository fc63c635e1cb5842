"""A run stopped by a signal ends its MLflow runs as KILLED, exits non-zero and resumes.

The issue's case: after `ray job stop` the MLflow parent and center runs stayed RUNNING and
the job's command exited 0. Here, on the shared Ray cluster with the tiny config:
(a) `python -m fedmrg run` (coordinator in an actor) as a driver subprocess, sent SIGTERM as
    soon as it prints its first round line: exit 143, the parent and both center runs KILLED,
    the round checkpoints it finished kept; `fedmrg run --resume` then finishes the same
    MLflow run (FINISHED, every round once);
(b) the coordinator in process (`Experiment(in_process=True)`) sent SIGINT: exit 130, the runs
    KILLED, the same way.
`ray job stop` sends SIGTERM to the job's processes (then SIGKILL 3 s later): the same
signal as (a); the variant through `ray job submit/stop` is in test_ray_jobs.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from click.testing import CliRunner
from helpers import tiny_overrides

from fedmrg.cli import main
from fedmrg.fl.checkpoint import list_checkpoints

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.slow]

ROUNDS = 3
FIRST_ROUND_TIMEOUT_S = 300  # start-up and round 1, on a loaded 2-core machine
EXIT_TIMEOUT_S = 60

IN_PROCESS = """
import sys
from fedmrg.config import load_config
from fedmrg.experiment import Experiment
from fedmrg.signals import RunInterrupted
try:
    Experiment(load_config("default", sys.argv[2:]), run_name=sys.argv[1],
               in_process=True).fit()
except RunInterrupted as e:
    sys.exit(e.exit_code)
"""


def overrides(tmp: Path) -> list[str]:
    return [*tiny_overrides(tmp), f"federation.rounds={ROUNDS}", "eval.num_beams=1",
            "eval.max_new_tokens=8", "eval.samples=1"]


def cli_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def stop_after_first_round(command: list[str], signum: int, tmp: Path, name: str
                           ) -> tuple[int, str, float]:
    """Start `command` as a driver of the session's cluster, send `signum` once it prints
    its round-1 line; (exit code, output, time.time() of the signal)."""
    log = tmp / f"{name}.log"
    idle_cpus = ray.available_resources().get("CPU", 0)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp)
    try:
        deadline = time.monotonic() + FIRST_ROUND_TIMEOUT_S
        while f"round 1/{ROUNDS}" not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"exited with {proc.returncode} before round 1:\n"
                            f"{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no round 1 within {FIRST_ROUND_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.1)
        sent, sent_at = time.monotonic(), time.time()
        proc.send_signal(signum)
        code = proc.wait(timeout=EXIT_TIMEOUT_S)
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # the driver is gone and Ray kills its actors: wait until nothing writes any more
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < idle_cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    output = log.read_text()
    print(f"{name}: exit {code} {stopped_s:.1f} s after the signal")
    return code, output, sent_at


def ended_after_s(run, sent_at: float) -> float:
    """Seconds from the signal to the MLflow run's end (`ray job stop` SIGKILLs after 3 s)."""
    return run.info.end_time / 1000 - sent_at


def mlflow_runs(tmp: Path, name: str):
    """(client, parent run, nested runs) of the run named `name`."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("fedmrg")
    parents = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    nested = client.search_runs([experiment.experiment_id],
                                f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return client, parents[0], nested


def test_sigterm_ends_the_runs_killed_exits_143_and_the_run_resumes(ray_cluster, tmp_path):
    items = overrides(tmp_path)
    code, output, sent_at = stop_after_first_round(
        [sys.executable, "-m", "fedmrg", "run", "--run-name", "stopped", *cli_args(items)],
        signal.SIGTERM, tmp_path, "stopped")
    assert code == 143, output[-4000:]
    assert "stopped by SIGTERM; continue run stopped from its last completed round with: " \
           "fedmrg run --resume stopped" in output
    assert "Traceback" not in output, output[-4000:]
    client, parent, nested = mlflow_runs(tmp_path, "stopped")
    assert parent.info.status == "KILLED", output[-3000:]
    print(f"stopped: MLflow run ended {ended_after_s(parent, sent_at):.1f} s after SIGTERM")
    assert parent.data.tags["fedmrg.end_reason"] == "driver stopped: stopped by SIGTERM"
    assert sorted(r.data.tags["fedmrg.center"] for r in nested) == ["a", "b"]
    assert {r.info.status for r in nested} == {"KILLED"}
    run_dir = tmp_path / "runs" / "stopped"
    done = [r for r, _ in list_checkpoints(run_dir / "checkpoints")]
    assert done, output[-3000:]  # at least round 1's, complete

    # resumed from its last checkpoint into the same MLflow run, to the end
    resumed = CliRunner().invoke(main, ["run", "--resume", "stopped",
                                        *cli_args([f"tracking.storage_path={tmp_path}/runs"])])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from the round-{done[-1]} checkpoint" in resumed.output
    assert f"round {ROUNDS}/{ROUNDS}" in resumed.output
    client, after, nested = mlflow_runs(tmp_path, "stopped")
    assert after.info.run_id == parent.info.run_id and after.info.status == "FINISHED"
    assert {r.info.status for r in nested} == {"FINISHED"}
    steps = sorted(m.step for m in client.get_metric_history(after.info.run_id, "round"))
    assert steps == list(range(1, ROUNDS + 1))


def test_sigint_in_process_ends_the_runs_killed_and_exits_130(ray_cluster, tmp_path):
    code, output, sent_at = stop_after_first_round(
        [sys.executable, "-c", IN_PROCESS, "inproc", *overrides(tmp_path)], signal.SIGINT,
        tmp_path, "inproc")
    assert code == 130, output[-4000:]
    _, parent, nested = mlflow_runs(tmp_path, "inproc")
    assert parent.info.status == "KILLED", output[-3000:]
    print(f"inproc: MLflow run ended {ended_after_s(parent, sent_at):.1f} s after SIGINT")
    assert len(nested) == 2 and {r.info.status for r in nested} == {"KILLED"}
    assert list_checkpoints(tmp_path / "runs" / "inproc" / "checkpoints")
