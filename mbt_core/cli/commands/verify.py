"""Verify an artifact folder: signatures, threshold, expiry, rollback, every file's hash.

Prints one line per problem and exits 1, or one OK line. The rollback state file is read,
never written: only loading a model records its version as accepted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbt_core.artifacts.load import verify_artifacts
from mbt_core.artifacts.manifest import manifest_digest
from mbt_core.artifacts.rollback import default_state_file
from mbt_core.jsonfields import format_time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder made by `mbt export`")
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        required=True,
        metavar="PUBLIC.pem",
        help="public key trusted to sign; repeat for several",
    )
    p.add_argument(
        "--threshold", type=int, default=1, help="distinct trusted signatures needed (default 1)"
    )
    p.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help=f"rollback state to check against (default {default_state_file()})",
    )


def run(args: argparse.Namespace) -> int:
    result = verify_artifacts(args.out_dir, args.trusted_key, args.threshold, args.state_file)
    if not result.ok or result.manifest is None:
        for problem in result.problems:
            print(problem.message, file=sys.stderr)
        print(f"mbt verify: FAILED, {len(result.problems)} problem(s)", file=sys.stderr)
        return 1
    m = result.manifest
    print(
        f"OK {args.out_dir}: {m.model_id} version {m.model_version}, "
        f"{len(result.valid_key_ids)} trusted signature(s) (threshold {args.threshold}), "
        f"{len(m.artifacts)} artifacts verified, expires {format_time(m.expires_at)}, "
        f"digest {manifest_digest(m)}"
    )
    return 0
