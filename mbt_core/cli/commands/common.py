"""Arguments and loading shared by the commands that need a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.model.checkpoint import Checkpoint, load_checkpoint


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a checkpoint file (default: the shipped model)",
    )
    src.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="a signed artifact folder made by `mbt export` (needs --trusted-key)",
    )
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        help="public key (PEM) trusted to sign the manifest; repeat for several",
    )
    p.add_argument(
        "--threshold",
        type=int,
        default=1,
        help="how many trusted signatures the manifest needs (default 1)",
    )


def load_model(args: argparse.Namespace) -> Checkpoint:
    if args.artifacts is not None:
        if not args.trusted_key:
            raise ValueError("--artifacts needs at least one --trusted-key")
        from mbt_core.artifacts.load import load_model_from_artifacts

        return load_model_from_artifacts(args.artifacts, args.trusted_key, args.threshold)
    return load_checkpoint(args.checkpoint)
