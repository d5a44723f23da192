"""Export a checkpoint as artifacts: a file per branch, a trunk, and a manifest to sign.

Writes into a new (or empty) OUT_DIR; sign it next with `mbt sign OUT_DIR --key PRIVATE.pem`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.checkpoint import load_checkpoint
from mbt_core.export import DEFAULT_MODEL_ID, export_artifacts
from mbt_core.manifest import format_time, manifest_digest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        default=None,
        help="checkpoint file to export (default: the shipped model)",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new or empty folder")
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="name nodes know the model by")
    p.add_argument(
        "--model-version",
        type=int,
        default=1,
        help="integer that only grows; nodes refuse a version below one they accepted",
    )
    p.add_argument("--expires-days", type=int, default=365, help="validity from now, in days")


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    manifest = export_artifacts(
        ckpt,
        args.out_dir,
        model_id=args.model_id,
        model_version=args.model_version,
        expires_days=args.expires_days,
    )
    print(
        f"exported {manifest.model_id} version {manifest.model_version}: "
        f"{len(manifest.artifacts)} artifacts in {args.out_dir}, "
        f"expires {format_time(manifest.expires_at)}"
    )
    print(f"manifest digest: {manifest_digest(manifest)}")
    print(f"next: mbt sign {args.out_dir} --key PRIVATE.pem")
    return 0
