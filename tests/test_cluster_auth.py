"""An authenticated cluster: `ray start --head` on 127.0.0.1 with Ray's token authentication
(RAY_AUTH_MODE=token) and TLS on its gRPC channels (RAY_USE_TLS, certificates made by
scripts/cluster_secrets.py). A driver holding the token and the certificate runs one federated
round on it (coordinator and client actors as `fedmrg run` starts them); drivers with a wrong
token, none, a certificate of another CA, or no TLS are refused (Ray's own error; the GCS logs
the failed TLS handshakes). Own ports and temp dir; teardown stops exactly that cluster (see
tests/test_ray_jobs.py). cluster.yaml and docs/operations.md carry the same settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import tiny_overrides
from servers import ray_cli_env, ray_head

from fedmrg.cluster_secrets import NODE_CERT, NODE_KEY, TOKEN, cluster_env, make_tls_files

ROOT = Path(__file__).resolve().parents[1]

PROBE = ("import ray, sys\n"
         "ray.init(address=sys.argv[1], log_to_driver=False)\n"
         "print('CONNECTED', ray.cluster_resources().get('CPU'))\n")


def _env(secrets: Path | None, **extra: str) -> dict[str, str]:
    return ray_cli_env(**{"PYTHONPATH": str(ROOT),
                          **(cluster_env(secrets) if secrets else {}), **extra})


@pytest.fixture(scope="module")
def secure_cluster():
    """(GCS address, secrets folder, base dir) of a token + TLS `ray start --head`."""
    base = Path(tempfile.mkdtemp(prefix="rauth-", dir="/tmp"))  # short: socket paths
    secrets = base / "secrets"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster_secrets.py"),
                           "--out", str(secrets), "--host", "127.0.0.1"],
                          env=_env(None), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        with ray_head(base, _env(secrets), num_cpus=4) as head:
            yield head["gcs"], secrets, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# One federated round by a driver on the cluster: the coordinator and a client actor hosting
# both centers, as `fedmrg run` starts them, without the run's evaluation, MLflow and exports
# (those are `fedmrg run`'s, tested elsewhere; here the question is who may join).
ROUND = """
import json, sys
import numpy as np
import ray
from fedmrg.config import load_config
from fedmrg.data.prepare import ensure_dataset
from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
from fedmrg.fl.coordinator import Coordinator
from fedmrg.fl.strategies import make_strategy
ray.init(address=sys.argv[1], log_to_driver=False)
cfg = make_strategy(load_config("default", json.loads(sys.argv[2]))).cfg
root = str(ensure_dataset(cfg.data))
actors, placement = start_client_actors(cfg, {"a": None, "b": None}, dataset_root=root, seed=0)
try:
    pool = RayClientPool(actors)
    initial = pool.call_all("shared_state", centers=["a"])["a"]
    coordinator = Coordinator(cfg, make_strategy(cfg), pool, initial, np.random.default_rng(0))
    summary = coordinator.step()
    print("ROUND", json.dumps({"participants": summary.participants,
                               "rejected": summary.rejected,
                               "nodes": sorted({p["node_id"] for p in placement.values()})}))
finally:
    stop_actors(actors.values())
"""


def driver(code: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A driver process; a refused one gives up after Ray's GCS reconnect timeout (5 s here,
    60 s by default)."""
    return subprocess.Popen([sys.executable, "-c", code, *args],
                            env={**env, "RAY_gcs_rpc_server_reconnect_timeout_s": "5"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # still retrying: it never got in either
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_with_the_token_and_certificate_runs_a_round(secure_cluster, tmp_path):
    address, secrets, _ = secure_cluster
    items = [o for o in tiny_overrides(tmp_path) if not o.startswith("federation.rounds")]
    items += ["federation.rounds=1", "resources.clients_per_actor=2"]
    rc, out, err = finish(driver(ROUND, [address, json.dumps(items)], _env(secrets)))
    assert rc == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("ROUND "))
    assert json.loads(line[len("ROUND "):])["participants"] == ["a", "b"]


@pytest.mark.ray
@pytest.mark.slow
def test_drivers_without_the_token_or_the_certificate_are_refused(secure_cluster, tmp_path):
    address, secrets, base = secure_cluster
    gcs_log = base / "ray" / "session_latest" / "logs" / "gcs_server.err"
    wrong = tmp_path / "token"
    wrong.write_text("0" * 64)
    other = tmp_path / "other"  # a certificate of another CA
    other.mkdir()
    for name, data in make_tls_files(["127.0.0.1"]).items():
        (other / name).write_bytes(data)
    without_token = {"wrong token": _env(secrets, RAY_AUTH_TOKEN_PATH=str(wrong)),
                     "no token": _env(secrets, RAY_AUTH_MODE="disabled")}
    without_cert = {"another CA": _env(secrets, RAY_TLS_SERVER_CERT=str(other / NODE_CERT),
                                       RAY_TLS_SERVER_KEY=str(other / NODE_KEY)),
                    "no TLS": _env(secrets, RAY_USE_TLS="0")}
    seen = len(gcs_log.read_text(errors="replace"))
    running = {name: driver(PROBE, [address], env)  # all at once: each waits for timeouts
               for name, env in {**without_token, **without_cert}.items()}
    done = {name: finish(proc, 120) for name, proc in running.items()}
    for name, (rc, out, _) in done.items():
        assert rc != 0 and "CONNECTED" not in out, (name, out)
    for name in without_token:
        assert "Authentication token is missing or incorrect" in done[name][2], name
    log = gcs_log.read_text(errors="replace")[seen:]  # the GCS refused their handshakes:
    assert "WRONG_VERSION_NUMBER" in log  # plaintext gRPC to a TLS port
    assert "BAD_SIGNATURE" in log  # a certificate its CA did not sign
    assert (secrets / TOKEN).stat().st_mode & 0o077 == 0  # the secrets are the owner's only


def test_cluster_yaml_and_the_docs_carry_the_same_settings(tmp_path):
    import yaml

    env = cluster_env(tmp_path)
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["file_mounts"]["~/fedmrg-secrets"] == "./cluster-secrets"
    setup = " ".join(config["setup_commands"])
    assert "scripts/cluster_secrets.py --out ~/fedmrg-secrets --node" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.startswith("source ~/fedmrg-secrets/cluster.env;"), key
    written = (tmp_path / "s")
    from fedmrg.cluster_secrets import ENV_FILE, write_cluster_secrets, write_node_certificate

    write_cluster_secrets(written, ["127.0.0.1"], keep_ca_key=True)
    assert write_node_certificate(written, ["10.0.0.7"]) == cluster_env(written)
    exported = (written / ENV_FILE).read_text()
    docs = (ROOT / "docs" / "operations.md").read_text()
    for name in env:  # every variable the script exports is named in the docs and cluster.env
        assert f"export {name}=" in exported and name in docs, name
