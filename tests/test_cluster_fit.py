"""A run on a cluster too small for it, a stall, a stale or running local cluster.

Unit: `fedmrg.fl.placement.resource_demand` / `check_fits` (pure), the watchdog's loop over
real Ray refs, `fedmrg.ray_cluster.choose_address` with a `ray_current_cluster` file under
RAY_TMPDIR. End to end (slow): a real `ray start --head --num-cpus=2` cluster and `fedmrg`
subprocesses joined to it through RAY_ADDRESS, as a user runs them:

- the default 4 clients (0.5 CPU each, plus a 0.25-CPU stream task each) are refused before
  any actor starts, with the keys and values that fit;
- with the pre-check passing but another job's actor holding a CPU, the first round's stream
  tasks cannot be scheduled: the watchdog fails the run naming Ray's pending demand, exit 2,
  in bounded time;
- that running cluster's address left in `ray_current_cluster`, and a stale file whose
  cluster is gone: `fedmrg data check` starts its own local cluster (no ValueError
  traceback), says in one line that the running one exists and how to join it; with
  `resources.ray_address=auto` it joins it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import free_ports, ray_cli_env, ray_head

from fedmrg.config import ConfigError, load_config
from fedmrg.experiment import client_layout
from fedmrg.fl.placement import ClusterTooSmallError, check_fits, resource_demand
from fedmrg.ray_cluster import (
    choose_address,
    cluster_autoscales,
    describe_demands,
    local_logical_cpus,
)

REPO = Path(__file__).resolve().parents[1]
FOUR = {c: None for c in "abcd"}


# --------------------------------------------------------------------------- the pure check


def _demand(overrides=(), clients=FOUR):
    return resource_demand(load_config("default", list(overrides)), clients)


def test_the_default_needs_three_cpus_for_four_clients():
    demand = _demand()
    assert demand.actors == 4
    assert demand.total == {"CPU": 4 * (0.5 + 0.25), "GPU": 0.0}
    assert check_fits(demand, {"CPU": 3.0}) == []
    assert check_fits(_demand(["resources.num_cpus_per_client=0.25"]), {"CPU": 2.0}) == []


def test_issue_case_two_cpus_is_refused_naming_keys_and_values_that_fit():
    with pytest.raises(ClusterTooSmallError) as e:
        check_fits(_demand(), {"CPU": 2.0, "GPU": 0.0})
    message = str(e.value)
    assert isinstance(e.value, ConfigError)  # the CLI prints it as one line, exit 2
    assert "4 client actors x (0.5 CPU [resources.num_cpus_per_client] + 0.25 CPU" in message
    assert "need 3 CPUs, the cluster has 2" in message
    assert "lower resources.num_cpus_per_client to 0.25" in message
    assert "raise resources.clients_per_actor to 2" in message
    assert "give the cluster at least 3 CPUs" in message
    assert "resources.autoscaling=true" in message
    # every suggestion really fits
    for fix in (["resources.num_cpus_per_client=0.25"], ["resources.clients_per_actor=2"]):
        assert check_fits(_demand(fix), {"CPU": 2.0}) == []


def test_a_stream_cpu_suggestion_when_that_is_what_fits():
    with pytest.raises(ClusterTooSmallError, match=r"lower data.stream_cpus_per_task to 0.1"):
        check_fits(_demand(["resources.num_cpus_per_client=0.4"]), {"CPU": 2.0})
    assert check_fits(_demand(["resources.num_cpus_per_client=0.4",
                               "data.stream_cpus_per_task=0.1"]), {"CPU": 2.0}) == []


def test_clients_per_actor_and_centralized_count_actors_not_clients():
    assert _demand(["resources.clients_per_actor=3"]).actors == 2
    assert _demand(clients=client_layout("centralized", list("abcd"))).actors == 1
    assert check_fits(_demand(clients=client_layout("centralized", list("abcd"))),
                      {"CPU": 1.0}) == []


def test_gpus_and_pinned_centers():
    with pytest.raises(ClusterTooSmallError) as e:
        check_fits(_demand(["resources.num_gpus_per_client=1"]), {"CPU": 8.0, "GPU": 2.0})
    assert "need 4 GPUs, the cluster has 2: lower resources.num_gpus_per_client to 0.5" in str(
        e.value)
    pinned = _demand(["resources.pin_centers=true"])
    assert pinned.custom == {"center_a": 1.0, "center_b": 1.0, "center_c": 1.0,
                             "center_d": 1.0}
    with pytest.raises(ClusterTooSmallError, match=r"no node offers center_c, center_d .*"
                                                   r"resources.pin_centers=false"):
        check_fits(pinned, {"CPU": 8.0, "center_a": 1.0, "center_b": 1.0})


def test_an_autoscaling_cluster_is_warned_not_refused(tmp_path):
    # cluster.yaml's head starts with 0 CPUs: every node is added on demand
    warnings = check_fits(_demand(), {"CPU": 0.0}, autoscaling=True)
    assert len(warnings) == 1 and "need 3 CPUs, the cluster has 0" in warnings[0]
    assert "starting anyway" in warnings[0]
    # detection: `ray up` leaves its config on the head node (where a job's driver runs)
    res = load_config("default").resources
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    assert not cluster_autoscales(res, str(bootstrap))
    bootstrap.write_text((REPO / "cluster.yaml").read_text())
    assert cluster_autoscales(res, str(bootstrap))
    bootstrap.write_text("cluster_name: fixed\nmax_workers: 0\n")
    assert not cluster_autoscales(res, str(bootstrap))
    forced = load_config("default", ["resources.autoscaling=false"]).resources
    assert not cluster_autoscales(forced, str(REPO / "cluster.yaml"))


def test_pending_demands_read_as_one_line():
    assert describe_demands([]) == "none"
    assert describe_demands([({"CPU": 0.25}, 5), ({"GPU": 1.0, "CPU": 1.0}, 1)]) == (
        "{CPU: 0.25} x 5, {CPU: 1, GPU: 1} x 1")


# --------------------------------------------------------------------------- which cluster


def _listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_stale_or_running_ray_current_cluster_is_not_joined_unasked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = load_config("default").resources
    assert choose_address(res) == (None, None)  # no file: a private local cluster
    (tmp_path / "ray").mkdir()
    current = tmp_path / "ray" / "ray_current_cluster"
    (dead,) = free_ports(1)
    current.write_text(f"127.0.0.1:{dead}")
    assert choose_address(res) == (None, None)  # stale: nothing to say
    with contextlib.closing(_listening()) as server:
        port = server.getsockname()[1]
        current.write_text(f"127.0.0.1:{port}")
        address, notice = choose_address(res)
        assert address is None
        assert f"running at 127.0.0.1:{port}" in notice
        assert "--set resources.ray_address=auto" in notice
        assert f"RAY_ADDRESS=127.0.0.1:{port}" in notice
        # asked for: joined, silently
        auto = load_config("default", ["resources.ray_address=auto"]).resources
        assert choose_address(auto) == ("auto", None)
        assert choose_address(res, {"RAY_ADDRESS": "10.0.0.1:6379"}) == ("10.0.0.1:6379", None)
        local = load_config("default", ["resources.ray_address=local"]).resources
        assert choose_address(local) == (None, None)


# --------------------------------------------------------------------------- the watchdog


@pytest.mark.ray
def test_the_watchdog_reports_a_stall_and_counts_each_reply_as_progress(ray_cluster):
    import ray

    from fedmrg.fl.actors import ProgressWatchdog

    @ray.remote(num_cpus=0)
    def sleep(s: float) -> float:
        time.sleep(s)
        return s

    ray.get([sleep.remote(0.2) for _ in range(3)])  # three warm workers: no start-up lag
    stalls = []
    watchdog = ProgressWatchdog(3.0, lambda what, idle: stalls.append((what, idle)))
    # replies 1 s apart: each resets the clock, no stall although the wait lasts ~3.5 s (the
    # 2 s margin absorbs a loaded machine's scheduling delays)
    refs = [sleep.remote(s) for s in (1.5, 2.5, 3.5)]
    ready, pending = watchdog.wait(refs, 3, None, "sleeps")
    assert sorted(ray.get(ready)) == [1.5, 2.5, 3.5] and not pending and not stalls

    # nothing for 3 s: reported (this callable waits on), again 3 s later, then the reply
    ready, pending = watchdog.wait([sleep.remote(7.0)], 1, None, "a slow sleep")
    assert len(ready) == 1 and len(stalls) >= 2
    assert {w for w, _ in stalls} == {"a slow sleep"} and all(i >= 3.0 for _, i in stalls)

    # a caller's own timeout still ends the wait
    stalls.clear()
    started = time.monotonic()
    ready, pending = watchdog.wait([sleep.remote(10.0)], 1, 4.5, "bounded")
    assert ready == [] and len(pending) == 1 and time.monotonic() - started < 7
    assert len(stalls) == 1

    class Stalled(Exception):
        pass

    def fail(what, idle):
        raise Stalled(what)

    with pytest.raises(Stalled, match="never"):
        ProgressWatchdog(1.0, fail).wait([sleep.remote(10.0)], 1, None, "never")


# --------------------------------------------------------------------------- a 2-CPU cluster

RUN_TIMEOUT_S = 420


def _env(**extra: str) -> dict[str, str]:
    return ray_cli_env(RAY_AUTH_MODE="disabled", **extra)


@pytest.fixture(scope="module")
def two_cpu_cluster():
    """`ray start --head --num-cpus=2` on 127.0.0.1 (own ports and temp dir, token auth off, no
    dashboard); yields (GCS address, the RAY_TMPDIR under which its `ray_current_cluster`
    lies). Teardown stops exactly that cluster (`servers.ray_head`)."""
    base = tempfile.mkdtemp(prefix="rfit-", dir="/tmp")  # short: socket paths
    try:
        with ray_head(Path(base), _env(), num_cpus=2) as head:
            yield head["gcs"], base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _small(tmp: Path, centers: int) -> list[str]:
    """The default config on a small phantom benchmark, one round, everything under `tmp`."""
    from helpers import tiny_overrides

    items = [o for o in tiny_overrides(tmp) if not o.startswith(("data.phantom.centers",
                                                                  "resources."))]
    return [*items, f"data.phantom.centers={centers}", "federation.rounds=1"]


def _fedmrg(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S
            ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedmrg", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    return done, time.monotonic() - started


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.ray
@pytest.mark.slow
def test_default_four_clients_on_two_cpus_are_refused_before_any_actor(two_cpu_cluster,
                                                                        tmp_path):
    address, _ = two_cpu_cluster
    done, _ = _fedmrg(["run", *_sets(_small(tmp_path, 4))], tmp_path,
                      _env(RAY_ADDRESS=address))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert "Traceback" not in output
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "the run does not fit the Ray cluster: 4 client actors x (0.5 CPU" in line
    assert "need 3 CPUs, the cluster has 2" in line
    assert "lower resources.num_cpus_per_client to 0.25" in line
    assert "raise resources.clients_per_actor to 2" in line
    # nothing started: no run line, and not even the base LM (built just before the actors)
    assert "clients a, b" not in done.stdout
    assert not (tmp_path / "lm").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_watchdog_fails_a_run_whose_stream_tasks_cannot_be_scheduled(two_cpu_cluster,
                                                                     tmp_path):
    """The pre-check passes (2 x (0.5 + 0.25) <= 2 CPUs), but another job's actor holds one
    CPU: the client actors take the other, their stream tasks wait for ever."""
    address, _ = two_cpu_cluster
    blocker = subprocess.Popen(
        [sys.executable, "-c",
         "import ray, time\n"
         "ray.init(log_to_driver=False)\n"
         "@ray.remote(num_cpus=1)\n"
         "class Hog:\n"
         "    def ping(self): return 1\n"
         "hog = Hog.remote(); ray.get(hog.ping.remote()); print('holding', flush=True)\n"
         "time.sleep(3600)\n"],
        env=_env(RAY_ADDRESS=address), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, start_new_session=True)
    try:
        assert blocker.stdout.readline().strip() == "holding"
        # long enough for the client actors' start under load (constructors build the
        # model): the stall the watchdog must catch is the first round's
        timeout_s = 90
        done, elapsed = _fedmrg(
            ["run", *_sets([*_small(tmp_path, 2), "resources.num_cpus_per_client=0.5",
                            f"resources.progress_timeout_s={timeout_s}"])],
            tmp_path, _env(RAY_ADDRESS=address))
    finally:
        os.killpg(blocker.pid, signal.SIGKILL)  # its driver gone, Ray removes the actor
        blocker.wait(timeout=10)
    output = done.stdout + done.stderr
    assert done.returncode == 5, output[-4000:]  # the run failed (fedmrg.exit_codes)
    assert "Traceback" not in output
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert f"(resources.progress_timeout_s={timeout_s}) while waiting for fit replies" in line
    assert "Ray's pending resource demands: {CPU: 0.25} x" in line
    assert "free: CPU 0 of 2" in line
    assert elapsed < RUN_TIMEOUT_S
    # the MLflow runs (parent and per center) ended FAILED, not RUNNING for ever
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_running_or_stale_local_cluster_gives_no_traceback(two_cpu_cluster, tmp_path):
    address, ray_tmpdir = two_cpu_cluster
    recorded = Path(ray_tmpdir, "ray", "ray_current_cluster")
    assert recorded.read_text().strip() == address  # what `ray start` left for ray.init()
    check = ["data", "check", *_sets(_small(tmp_path, 2))]

    # RAY_ADDRESS unset, that cluster running: a private local cluster, and a line saying so
    done, _ = _fedmrg(check, tmp_path, _env(RAY_TMPDIR=ray_tmpdir))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "num_cpus and num_gpus must not" not in output
    assert f"ray: {local_logical_cpus()} logical CPUs" in done.stdout
    assert f"a Ray cluster started by `ray start` is running at {address}" in done.stderr
    assert "--set resources.ray_address=auto" in done.stderr

    # asked to: joins it
    done, _ = _fedmrg([*check, "--set", "resources.ray_address=auto"], tmp_path,
                      _env(RAY_TMPDIR=ray_tmpdir))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "ray: 2 logical CPUs" in done.stdout

    # a stale file (its cluster gone): a private local cluster, nothing to say
    stale = Path(tempfile.mkdtemp(prefix="rstale-", dir="/tmp"))
    try:
        (stale / "ray").mkdir()
        (dead,) = free_ports(1)
        (stale / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
        done, _ = _fedmrg(check, tmp_path, _env(RAY_TMPDIR=str(stale)))
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "Traceback" not in output
        assert f"ray: {local_logical_cpus()} logical CPUs" in done.stdout
        assert "is running at" not in done.stderr
    finally:
        shutil.rmtree(stale, ignore_errors=True)
