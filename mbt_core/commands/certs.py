"""Cluster TLS certificates: `mbt certs init` makes the CA, `mbt certs issue` a certificate.

Every node, gateway and client gets an ECDSA P-256 certificate from the cluster CA; gRPC uses
them for mutual TLS. A certificate's fingerprint (SHA-256 of its public key) is the node id
that rosters list and mDNS advertises. Private keys are written with mode 0600 and never
overwritten; --renew re-issues a certificate for the same key (same node id).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.certs import DEFAULT_SANS, ROLES, certificate_file_fingerprint, init_ca, issue_cert


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

    fp = sub.add_parser("fingerprint", help="print a certificate's node id")
    fp.add_argument("cert", type=Path, metavar="CERT", help="PEM or DER certificate")


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
    print(certificate_file_fingerprint(args.cert))
    return 0
