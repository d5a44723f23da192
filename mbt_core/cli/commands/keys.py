"""Manage Ed25519 signing keys: `mbt keys generate --out DIR` makes a key pair.

The private key is written with mode 0600 and never overwritten; the key id printed is the
SHA-256 of the raw public key, the name signatures and verification messages use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.trust.keys import generate_key


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = sub.add_parser(
        "generate",
        help="make a new key pair",
        description="Write NAME.private.pem (mode 0600) and NAME.public.pem into DIR.",
    )
    gen.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the keys")
    gen.add_argument("--name", default="mbt-signing", help="file name stem (default mbt-signing)")


def run(args: argparse.Namespace) -> int:
    if args.keys_command != "generate":
        raise ValueError(f"unknown keys action {args.keys_command!r}")
    key = generate_key(args.out, args.name)
    print(f"key id: {key.key_id}")
    print(f"private key: {key.private_path} (keep it secret; never commit it)")
    print(f"public key: {key.public_path} (give it to verifiers as --trusted-key)")
    return 0
