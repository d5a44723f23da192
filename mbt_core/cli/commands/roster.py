"""Rosters of allowed nodes: `mbt roster sign` lists node ids, `mbt roster verify` checks one.

A node id is the fingerprint of a node's TLS certificate (`mbt certs fingerprint CERT`); give
ids with --node-id or certificates with --cert. Sign with one or more manifest-signing keys;
the gateway verifies the roster like the manifest (trusted keys and threshold, or a trust root).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.fileio import atomic_write_bytes
from mbt_core.jsonfields import format_time
from mbt_core.trust.certs import certificate_file_fingerprint
from mbt_core.trust.keys import load_private_key, short_id
from mbt_core.trust.root import TrustRoot, resolve_trust_root
from mbt_core.trust.roster import read_roster, sign_roster


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="roster_command", required=True, metavar="ACTION")
    sign = sub.add_parser("sign", help="write a signed roster")
    sign.add_argument(
        "--node-id",
        action="extend",
        nargs="+",
        default=[],
        help="node ids (certificate fingerprints)",
    )
    sign.add_argument(
        "--cert",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        help="node certificates to take the ids from",
    )
    sign.add_argument(
        "--key",
        type=Path,
        action="extend",
        nargs="+",
        required=True,
        metavar="PRIVATE.pem",
        help="signing keys (several for a threshold)",
    )
    sign.add_argument("--version", type=int, default=1, help="roster version (default 1)")
    sign.add_argument("--expires-days", type=int, default=90, help="validity (default 90)")
    sign.add_argument("--out", type=Path, required=True, help="file to write")

    verify = sub.add_parser("verify", help="check a roster and print its node ids")
    verify.add_argument("roster", type=Path, metavar="ROSTER")
    verify.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        help="trusted public key",
    )
    verify.add_argument("--threshold", type=int, default=1, help="signatures needed")
    verify.add_argument("--root", type=Path, default=None, help="a pinned trust root instead")
    verify.add_argument(
        "--update",
        type=Path,
        action="append",
        default=[],
        help="later trust roots, in order",
    )


def run(args: argparse.Namespace) -> int:
    if args.roster_command == "sign":
        ids = list(args.node_id)
        ids += [certificate_file_fingerprint(c) for c in args.cert]
        if not ids:
            raise ValueError("give at least one --node-id or --cert")
        keys = [load_private_key(k) for k in args.key]
        document = sign_roster(ids, keys, version=args.version, expires_days=args.expires_days)
        atomic_write_bytes(args.out, document.to_json())
        print(
            f"wrote {args.out}: roster version {args.version}, {len(set(ids))} node id(s), "
            f"signed by {', '.join(short_id(k) for k, _ in document.signatures)}"
        )
        return 0
    trust: list[Path] | TrustRoot
    if args.root is not None:
        if args.trusted_key:
            raise ValueError("give either --root or --trusted-key, not both")
        trust = resolve_trust_root(args.root, args.update, persist=False)
    elif args.trusted_key:
        trust = args.trusted_key
    else:
        raise ValueError("give --trusted-key (one or more) or --root")
    roster = read_roster(args.roster, trust, args.threshold)
    print(
        f"OK {args.roster}: roster version {roster.version}, {len(roster.node_ids)} node id(s), "
        f"expires {format_time(roster.expires_at)}"
    )
    for node_id in sorted(roster.node_ids):
        print(node_id)
    return 0
