"""Secrets of an authenticated Ray cluster (pure, no Ray): Ray's shared auth token and the TLS
files for Ray's gRPC channels, and the environment every node and driver needs to use them
(docs/operations.md, "Security model").

    env = write_cluster_secrets("secrets/", hosts=["127.0.0.1", "10.0.0.5", "head.local"])
    # secrets/: auth_token, ca.crt, node.crt, node.key (0600), cluster.env

Ray's TLS is mutual: every node and every driver presents the same node certificate
(RAY_TLS_SERVER_CERT / RAY_TLS_SERVER_KEY) and accepts peers signed by the CA (RAY_TLS_CA_CERT),
so the node certificate carries both server and client use and names every host in `hosts`.
The CA key is kept only when asked (`keep_ca_key`): an autoscaled cluster's nodes get their
addresses at launch, so each node signs its own certificate (`write_node_certificate`, run by
cluster.yaml's setup); without it a new node means new secrets for the whole cluster.
Token authentication (RAY_AUTH_MODE=token) makes every RPC and HTTP entry point require the
token; TLS also encrypts the traffic, so the token is never seen on the wire.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN, CA_CERT, CA_KEY, NODE_CERT, NODE_KEY, ENV_FILE = (
    "auth_token", "ca.crt", "ca.key", "node.crt", "node.key", "cluster.env")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmrg cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


_PEM = serialization.Encoding.PEM


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_tls_files(hosts: Sequence[str], days: int = 365) -> dict[str, bytes]:
    """{CA_CERT, CA_KEY, NODE_CERT, NODE_KEY: PEM bytes}: a fresh CA and a node certificate it
    signs, valid for `hosts` (IP addresses or DNS names) for `days`."""
    start, end = _validity(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedmrg cluster CA"))
          .issuer_name(_name("fedmrg cluster CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    return {CA_CERT: ca.public_bytes(_PEM), CA_KEY: _key_pem(ca_key),
            **sign_node_certificate(ca, ca_key, hosts, days)}


def sign_node_certificate(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                          hosts: Sequence[str], days: int = 365) -> dict[str, bytes]:
    """{NODE_CERT, NODE_KEY: PEM bytes}: a new key and its certificate signed by the CA, for
    server and client use, naming `hosts`."""
    if not hosts:
        raise ValueError("at least one host (IP address or DNS name) for the node certificate")
    start, end = _validity(days)
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return {NODE_CERT: node.public_bytes(_PEM), NODE_KEY: _key_pem(node_key)}


def cluster_env(directory: str | Path, *, token: bool = True, tls: bool = True
                ) -> dict[str, str]:
    """The environment a node or driver needs for the secrets in `directory`."""
    d = Path(directory).resolve()
    env = {}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(d / TOKEN))
    if tls:
        env.update(RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=str(d / NODE_CERT),
                   RAY_TLS_SERVER_KEY=str(d / NODE_KEY), RAY_TLS_CA_CERT=str(d / CA_CERT))
    return env


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_files(d: Path, files: dict[str, bytes]) -> dict[str, str]:
    for name, data in files.items():
        if name in (NODE_KEY, CA_KEY, TOKEN):
            _write_private(d / name, data)
        else:
            (d / name).write_bytes(data)
    env = cluster_env(d)
    (d / ENV_FILE).write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def write_cluster_secrets(directory: str | Path, hosts: Sequence[str], days: int = 365, *,
                          keep_ca_key: bool = False) -> dict[str, str]:
    """Write a new token, CA, node certificate and key (secrets 0600; the CA key only with
    `keep_ca_key`) and `cluster.env` (`export` lines) to `directory`; returns the
    environment (`cluster_env`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    files = {TOKEN: secrets.token_hex(32).encode(), **make_tls_files(hosts, days)}
    if not keep_ca_key:
        del files[CA_KEY]
    return _write_files(d, files)


def write_node_certificate(directory: str | Path, hosts: Sequence[str], days: int = 365,
                           ) -> dict[str, str]:
    """On a node: sign its own certificate for `hosts` with the CA in `directory` (made by
    `write_cluster_secrets(keep_ca_key=True)`) and rewrite `cluster.env` for where it lies."""
    d = Path(directory)
    ca = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{d / CA_KEY}: not the EC key of a fedmrg cluster CA")
    return _write_files(d, sign_node_certificate(ca, ca_key, hosts, days))
