"""Trust roots: the manifest-signing keys a node or gateway trusts, and their rotation.

`mbt trust init` writes root v1 (pin it on every machine). `mbt trust rotate` writes root N+1,
which must be signed by a threshold of root N's keys and a threshold of its own keys (give
both sets with --sign-with). `mbt trust verify` checks a pinned root and its updates in order
and prints the root in force; it reads the accepted-roots state but never writes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.fileio import atomic_write_bytes
from mbt_core.trust.keys import load_private_key, load_public_key
from mbt_core.trust.root import TrustRoot, create_root, read_root, resolve_trust_root, rotate_root


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="write root version 1")
    _add_new_root_arguments(init, key_flag="--key")

    rotate = sub.add_parser("rotate", help="write the next root version")
    rotate.add_argument("--current", type=Path, required=True, help="the root in force")
    _add_new_root_arguments(rotate, key_flag="--new-key")

    verify = sub.add_parser("verify", help="check a pinned root and its updates")
    verify.add_argument("--root", type=Path, required=True, help="the pinned root (version 1)")
    verify.add_argument(
        "--update",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        help="later roots, applied in the order given (a chain v2 v3 ...)",
    )
    verify.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="accepted-roots state to read (default $MBT_STATE_DIR/trust-roots.json)",
    )


def _add_new_root_arguments(p: argparse.ArgumentParser, key_flag: str) -> None:
    p.add_argument(
        key_flag,
        dest="keys",
        type=Path,
        action="extend",
        nargs="+",
        required=True,
        metavar="PUBLIC.pem",
        help="public keys the root trusts",
    )
    p.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="signatures a manifest needs (default: 1 for init, the current root's for rotate)",
    )
    p.add_argument("--expires", type=int, default=365, metavar="DAYS", help="validity in days")
    p.add_argument(
        "--sign-with",
        type=Path,
        action="extend",
        nargs="+",
        required=True,
        metavar="PRIVATE.pem",
        help="private keys that sign the root (a threshold; for a rotation, old and new)",
    )
    p.add_argument("--out", type=Path, required=True, help="file to write the root to")


def run(args: argparse.Namespace) -> int:
    if args.trust_command == "verify":
        root = resolve_trust_root(args.root, args.update, args.state_file, persist=False)
        print(f"OK {root.describe()}")
        return 0
    keys = [load_public_key(p) for p in args.keys]
    signers = [load_private_key(p) for p in args.sign_with]
    if args.trust_command == "init":
        root = create_root(keys, args.threshold or 1, signers, expires_days=args.expires)
    else:
        current = read_root(args.current)
        threshold = args.threshold or min(current.threshold, len(keys))  # never weaker silently
        root = rotate_root(current, keys, threshold, signers, expires_days=args.expires)
    _write(args.out, root)
    print(f"wrote {args.out}: {root.describe()}")
    return 0


def _write(path: Path, root: TrustRoot) -> None:
    if path.exists():
        raise ValueError(f"{path}: already exists; write each root version to a new file")
    atomic_write_bytes(path, root.document.to_json())
