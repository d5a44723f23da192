"""Sign an exported artifact folder: adds signatures/<key id>.sig for the manifest.

Every artifact's size and hash is checked first, since a signature vouches for the files the
manifest lists; an expired manifest is not signed. Run once per signer for a threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbt_core.artifacts.load import expiry_problem, file_problems
from mbt_core.artifacts.manifest import manifest_digest, read_manifest
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.trust.keys import key_id, load_private_key, short_id


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder made by `mbt export`")
    p.add_argument("--key", type=Path, required=True, metavar="PRIVATE.pem", help="signing key")


def run(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    manifest = read_manifest(args.out_dir)
    expired = expiry_problem(args.out_dir, manifest)
    problems = file_problems(args.out_dir, manifest) + ([expired] if expired else [])
    for problem in problems:
        print(problem.message, file=sys.stderr)
    if problems:
        print(f"mbt sign: not signed, {len(problems)} problem(s)", file=sys.stderr)
        return 1
    path = sign_manifest(args.out_dir, manifest, key)
    print(
        f"signed {manifest.model_id} version {manifest.model_version} "
        f"(digest {manifest_digest(manifest)}) with key {short_id(key_id(key.public_key()))}: "
        f"{path}"
    )
    return 0
