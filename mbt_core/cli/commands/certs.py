"""Cluster TLS certificates: `mbt certs init` makes the CA, `mbt certs cluster` every
certificate a cluster needs at once, `mbt certs issue` one more.

Every node, gateway and client gets an ECDSA P-256 certificate from the cluster CA; gRPC uses
them for mutual TLS. A certificate's fingerprint (SHA-256 of its public key) is the node id
that rosters list and mDNS advertises. Private keys are written with mode 0600 and never
overwritten; --renew re-issues a certificate for the same key (same node id).

    mbt certs init --out ca/
    mbt certs cluster --ca ca/ --out certs/ --nodes 4 --gateway-san 10.0.0.2,gw.example

`cluster` writes node-0..node-N-1 (role node), gateway (role aggregator, with the SANs clients
reach it at) and client (role client), and a copy of ca.crt, so that one folder holds what
every process is given (each process needs its own .crt and .key and ca.crt, never ca.key).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mbt_core.trust.certs import (
    CA_CERT,
    DEFAULT_SANS,
    ROLES,
    certificate_file_fingerprint,
    init_ca,
    issue_cert,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="make a cluster CA (ca.crt, ca.key)")
    init.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the CA")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.add_argument("--name", default="mbt cluster CA", help="the CA's common name")

    issue = sub.add_parser("issue", help="issue NAME.crt and NAME.key signed by the CA")
    issue.add_argument("--ca", type=Path, required=True, metavar="DIR", help="folder of the CA")
    issue.add_argument("--name", required=True, help="certificate name (file stem, CN)")
    issue.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    issue.add_argument("--role", choices=ROLES, default="node", help="node (default), ...")
    issue.add_argument(
        "--san",
        default=",".join(DEFAULT_SANS),
        help=f"comma-separated IP addresses and DNS names (default {','.join(DEFAULT_SANS)})",
    )
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.add_argument(
        "--renew", action="store_true", help="keep the existing NAME.key, replace NAME.crt"
    )

    cluster = sub.add_parser(
        "cluster", help="issue the certificates of a whole cluster: nodes, gateway, client"
    )
    cluster.add_argument("--ca", type=Path, required=True, metavar="DIR", help="folder of the CA")
    cluster.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    cluster.add_argument(
        "--nodes",
        type=_node_names,
        default=_node_names("4"),
        metavar="N|NAME,...",
        help="how many node certificates (node-0, node-1, ...), or their names (default 4)",
    )
    cluster.add_argument(
        "--gateway-san",
        default=",".join(DEFAULT_SANS),
        help="addresses and DNS names clients reach the gateway at "
        f"(default {','.join(DEFAULT_SANS)})",
    )
    cluster.add_argument("--days", type=int, default=365, help="validity in days (default 365)")

    fp = sub.add_parser("fingerprint", help="print a certificate's node id")
    fp.add_argument("cert", type=Path, metavar="CERT", help="PEM or DER certificate")


def _node_names(text: str) -> tuple[str, ...]:
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= 1024:
            raise argparse.ArgumentTypeError(f"--nodes must be 1..1024, got {count}")
        return tuple(f"node-{i}" for i in range(count))
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("--nodes takes a count or distinct names, a,b,c")
    return names


def _cluster(args: argparse.Namespace) -> int:
    sans = [s for s in args.gateway_san.split(",") if s.strip()]
    plan = [(name, "node", list(DEFAULT_SANS)) for name in args.nodes]
    plan += [("gateway", "aggregator", sans), ("client", "client", list(DEFAULT_SANS))]
    for name, role, names in plan:
        issued = issue_cert(args.ca, name, args.out, role=role, sans=names, days=args.days)
        print(f"{issued.cert_path.name:<16} {role:<10} id {issued.fingerprint}")
    shutil.copyfile(Path(args.ca) / CA_CERT, Path(args.out) / CA_CERT)
    print(f"{CA_CERT:<16} the CA certificate every process is given (never give out ca.key)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.certs_command == "init":
        ca = init_ca(args.out, common_name=args.name, days=args.days)
        print(f"CA certificate: {ca.cert_path} (give it to every node, gateway and client)")
        print(f"CA key: {ca.key_path} (keep it secret and offline; never commit it)")
        return 0
    if args.certs_command == "issue":
        sans = [s for s in args.san.split(",") if s.strip()]
        issued = issue_cert(
            args.ca,
            args.name,
            args.out,
            role=args.role,
            sans=sans,
            days=args.days,
            renew=args.renew,
        )
        print(f"certificate: {issued.cert_path}")
        print(f"key: {issued.key_path} (mode 0600)")
        print(f"node id: {issued.fingerprint}")
        return 0
    if args.certs_command == "cluster":
        return _cluster(args)
    print(certificate_file_fingerprint(args.cert))
    return 0
