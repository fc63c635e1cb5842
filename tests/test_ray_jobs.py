"""`ray job submit --working-dir . -- python ray_jobs/<x>.py ...` against a real `ray start --head`.

prepare_data, train (its round checkpoints written; resubmitted with the same run name, the
finished run does nothing), evaluate.

The external cluster is a second Ray on this machine, beside the session's `ray_cluster` (which
may be running in this same pytest process): its own temp dir, its own free ports, its own
worker port range, token auth off (`RAY_AUTH_MODE=disabled`), and the job CLI reaches it only
through its dashboard address. Teardown stops exactly that cluster: `ray start --block` runs in
its own process session and shuts its processes down on SIGTERM; the session is then killed by
its id. (`ray stop` is not used: it stops every Ray on the machine, the session's included.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import tiny_overrides
from servers import ray_cli_env, ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, python
JOB_TIMEOUT_S = 240


def _env() -> dict[str, str]:
    return ray_cli_env(RAY_AUTH_MODE="disabled")


@pytest.fixture(scope="module")
def external_cluster():
    """A `ray start --head` cluster on 127.0.0.1; yields its dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: socket paths
    try:
        with ray_head(Path(temp_dir), _env(), num_cpus=4, dashboard=True) as head:
            yield head["dashboard"]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python <args>`, waiting for the job to finish."""
    command = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", ".",
               "--", "python", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def test_prepare_data_then_train_as_ray_jobs(external_cluster, tmp_path):
    # prepare_data: the phantom benchmark the tiny config asks for, written by the job
    prepared = _submit(external_cluster, "ray_jobs/prepare_data.py", "phantom",
                       "--out", str(tmp_path / "data"), "--centers", "2",
                       "--studies-per-center", "20", "--image-size", "32", "--no-heldout")
    assert prepared.returncode == 0, prepared.stdout[-4000:] + prepared.stderr[-2000:]
    assert "center a: train" in prepared.stdout
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert sorted(manifest["centers"]) == ["a", "b"]

    # train: the same options as `fedmrg run`, on that dataset (not regenerated)
    summary = tmp_path / "summary.json"
    args = ["ray_jobs/train.py", "--strategy", "fedavg", "--run-name", "job-fedavg",
            "--summary-json", str(summary)]
    for item in tiny_overrides(tmp_path):
        args += ["--set", item]
    trained = _submit(external_cluster, *args)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-6000:]
    assert "succeeded" in output and "round 2/2" in output and "| mean |" in output
    result = json.loads(summary.read_text())
    assert result["strategy"] == "fedavg" and len(result["rounds"]) == 2
    assert sorted(result["generalization"]["per_center"]) == ["a", "b"]
    # the clients ran on the external cluster, not on this process's session cluster
    nodes = {info["node_id"] for info in result["placement"].values()}
    assert len(nodes) == 1
    import ray

    if ray.is_initialized():
        assert nodes.isdisjoint({n["NodeID"] for n in ray.nodes()})
    assert (Path(result["storage_dir"]) / "generic_adapter" / "adapter_config.json").is_file()
    checkpoints = sorted(p.name for p in (Path(result["storage_dir"]) / "checkpoints").iterdir())
    assert checkpoints == ["round-000001", "round-000002"]

    # the same job resubmitted (same run name): it would resume; the run is finished, so the
    # job says so and does nothing
    again = _submit(external_cluster, *args)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "run job-fedavg already finished its 2 rounds; nothing to do" in again.stdout
    assert "round 1/2" not in again.stdout

    # evaluate: the finished run's saved models, as a third job
    metrics = tmp_path / "eval.json"
    evaluated = _submit(external_cluster, "ray_jobs/evaluate.py", result["storage_dir"],
                        "--center", "a", "--json", str(metrics))
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-4000:]
    scores = json.loads(metrics.read_text())
    assert list(scores["generalization"]["per_center"]) == ["a"]
    assert scores["generalization"]["per_center"]["a"]["bleu4"] == pytest.approx(
        result["generalization"]["per_center"]["a"]["bleu4"], abs=1e-6)


def _ray(address: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args, f"--address={address}"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout_s)


def test_ray_job_stop_ends_the_mlflow_runs_killed(external_cluster, tmp_path):
    """The issue's case: after `ray job stop` the MLflow runs stayed RUNNING. Ray sends the
    driver SIGTERM, then SIGKILL 3 s later (RAY_JOB_STOP_WAIT_TIME_S): the runs must be ended
    by then."""
    import time

    from mlflow import MlflowClient

    job_id = f"stop-{os.getpid()}"
    args = ["ray_jobs/train.py", "--run-name", "job-stopped"]
    # many rounds: a tiny round takes about a second, and the stop must reach a running job
    # (the run is stopped after round 1 either way, so this costs nothing)
    for item in [*tiny_overrides(tmp_path), "federation.rounds=40"]:
        args += ["--set", item]
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address={external_cluster}", "--no-wait",
         f"--submission-id={job_id}", "--working-dir", ".", "--", "python", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    logs = ""
    while "round 1/40" not in logs:
        assert time.monotonic() < deadline, f"no round 1 within {JOB_TIMEOUT_S} s:\n{logs[-4000:]}"
        time.sleep(2)
        logs = _ray(external_cluster, "logs", job_id).stdout
        status = _ray(external_cluster, "status", job_id).stdout
        assert "RUNNING" in status or "PENDING" in status, status + logs[-4000:]
    stopped = _ray(external_cluster, "stop", job_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = _ray(external_cluster, "status", job_id)
    assert f"Job '{job_id}' was stopped" in status.stdout + status.stderr
    logs = _ray(external_cluster, "logs", job_id).stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fedmrg")
    parents = client.search_runs([experiment.experiment_id],
                                 "attributes.run_name = 'job-stopped'")
    assert len(parents) == 1
    nested = client.search_runs([experiment.experiment_id],
                                f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    statuses = [parents[0].info.status, *(r.info.status for r in nested)]
    assert statuses == ["KILLED"] * 3, logs[-4000:]
    assert "stopped by SIGTERM; continue run job-stopped" in logs
