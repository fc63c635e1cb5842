"""Make the secrets of an authenticated Ray cluster: Ray's auth token and TLS files.

    python scripts/cluster_secrets.py --out ~/.fedmrg/cluster --host 127.0.0.1 --host 10.0.0.5
    source ~/.fedmrg/cluster/cluster.env     # on every node and driver, then `ray start` ...

Copy the folder to every node (and driver) over a trusted channel. Nodes whose addresses are
known only at launch (cluster.yaml): make the folder with --keep-ca-key, and on each node run
`--out FOLDER --node --host <its IP>` to sign its own certificate. docs/operations.md ("Security
model"), fedmrg/cluster_secrets.py.
"""

from __future__ import annotations

import argparse

from fedmrg.cluster_secrets import ENV_FILE, write_cluster_secrets, write_node_certificate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the secrets (made 0700)")
    parser.add_argument("--host", action="append", default=[],
                        help="an IP address or DNS name of a node (repeat; default 127.0.0.1)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    parser.add_argument("--keep-ca-key", action="store_true",
                        help="keep the CA key, so nodes can sign their own certificates")
    parser.add_argument("--node", action="store_true",
                        help="on a node: sign a certificate for --host with the CA in --out")
    args = parser.parse_args(argv)
    hosts = args.host or ["127.0.0.1"]
    env = (write_node_certificate(args.out, hosts, args.days) if args.node else
           write_cluster_secrets(args.out, hosts, args.days, keep_ca_key=args.keep_ca_key))
    for key, value in env.items():
        print(f"{key}={value}")
    print(f"# source {args.out}/{ENV_FILE} on every node and driver")


if __name__ == "__main__":
    main()
