"""Helpers for tests that start a real server process (ray start --head, mlflow server)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open at once, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until_serving(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float,
                       interval_s: float = 0.5) -> None:
    """Poll `url` until it answers 200; fail with the log tail if the process exits or the
    deadline passes (a server that never comes up must not hang the suite)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n"
                        f"{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout_s} s:\n"
                        f"{log_path.read_text()[-3000:]}")
        time.sleep(interval_s)


RAY_BIN = Path(sys.executable).parent / "ray"  # the venv's


def ray_cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `ray`, `fedmrg` or driver subprocess of the cluster tests: this
    process's without any Ray address, token or TLS setting (each test sets its own), offline
    and quiet, the venv's bin first on PATH; `extra` on top."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TLS", "RAY_USE_TLS"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
               TOKENIZERS_PARALLELISM="false",
               PATH=f"{RAY_BIN.parent}{os.pathsep}{os.environ['PATH']}")
    env.update(extra)
    return env


@contextlib.contextmanager
def ray_head(base: Path, env: dict[str, str], *, num_cpus: int, dashboard: bool = False,
             start_timeout_s: float = 120) -> Iterator[dict[str, str]]:
    """A `ray start --head --block` cluster on 127.0.0.1 with its own ports and temp dir under
    `base` (keep it short: Ray's socket paths), started with `env` (token/TLS settings go
    there). Yields {"gcs": host:port, "dashboard": URL or ""}. Teardown stops exactly that
    cluster (its process group), never another one on the host.

    Its 100 worker ports lie in 20000-32767: above Ray's default 10002-19999 (the shared test
    cluster's) and below Linux's ephemeral range (32768-60999), where `free_ports` and the
    kernel pick the other ports (a worker range there collided with them)."""
    ports = free_ports(9)
    worker_low = 20000 + (os.getpid() % 127) * 100
    command = [
        str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={ports[0]}", f"--ray-client-server-port={ports[1]}",
        f"--node-manager-port={ports[2]}", f"--object-manager-port={ports[3]}",
        f"--dashboard-agent-listen-port={ports[4]}", f"--dashboard-agent-grpc-port={ports[5]}",
        f"--runtime-env-agent-port={ports[6]}", f"--metrics-export-port={ports[7]}",
        f"--min-worker-port={worker_low}", f"--max-worker-port={worker_low + 99}",
        f"--num-cpus={num_cpus}", f"--object-store-memory={300 * 1024 * 1024}",
        f"--temp-dir={base}/ray", "--disable-usage-stats",
        *([f"--dashboard-port={ports[8]}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true"] if dashboard else ["--include-dashboard=false"]),
    ]
    log_path = Path(base) / "ray-start.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in teardown
    # a loaded machine (the suite beside other work) may take a while to start a raylet
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=base,
                            env={"RAY_raylet_start_wait_time_s": "120", **env},
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports[8]}" if dashboard else ""
    try:
        deadline = time.monotonic() + start_timeout_s
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        if dashboard:
            wait_until_serving(proc, f"{url}/api/version", log_path,
                               max(deadline - time.monotonic(), 10), interval_s=1)
        yield {"gcs": f"127.0.0.1:{ports[0]}", "dashboard": url}
    finally:
        # --block shuts its cluster down on SIGTERM, but takes longer than the 30 s we once
        # waited (every teardown hit it); the process group's SIGKILL ends it all anyway
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of that session is left
        proc.wait(timeout=10)
        log.close()
