"""Helpers for tests that start a real server process (ray start --head, mlflow server)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
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
