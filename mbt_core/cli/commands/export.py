"""Export a checkpoint as artifacts: a file per branch, a trunk, and a manifest to sign.

Writes into a new (or empty) OUT_DIR; sign it next with `mbt sign OUT_DIR --key PRIVATE.pem`.
Each branch's output-norm bound is calibrated on text (default: the start of the shipped
validation works) and signed into the manifest; the gateway clips or rejects outputs beyond it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.artifacts.calibration import DEFAULT_MARGIN, DEFAULT_TOKENS, calibrated_bounds
from mbt_core.artifacts.export import DEFAULT_MODEL_ID, export_artifacts
from mbt_core.artifacts.manifest import manifest_digest
from mbt_core.artifacts.rollback import default_state_file, next_version
from mbt_core.jsonfields import format_time
from mbt_core.model.checkpoint import load_checkpoint


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
        default=None,
        help="integer that only grows; nodes refuse a version below one they accepted, and a "
        "second export under an accepted version (default: the time of the export, "
        "YYYYMMDDHHMMSSmmm, or one above what this machine accepted for the model id)",
    )
    p.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="rollback state whose accepted versions the default version stays above "
        "(default: $MBT_STATE_DIR or ~/.local/state/mbt)",
    )
    p.add_argument("--expires-days", type=int, default=365, help="validity from now, in days")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="text to calibrate the branch output-norm bounds on "
        "(default: the shipped validation works)",
    )
    cal.add_argument("--no-calibration", action="store_true", help="sign no output-norm bounds")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="tokens of calibration text to run",
    )
    p.add_argument(
        "--norm-margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="bound = margin x the largest output norm seen in calibration",
    )


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    bounds, calibrated = None, 0
    if not args.no_calibration:
        bounds, calibrated = calibrated_bounds(
            ckpt, args.calibration, args.calibration_tokens, args.norm_margin
        )
    version = args.model_version
    if version is None:
        version = next_version(args.state_file or default_state_file(), args.model_id)
    elif version < 1:
        raise ValueError(f"--model-version must be >= 1, got {version}")
    manifest = export_artifacts(
        ckpt,
        args.out_dir,
        model_id=args.model_id,
        model_version=version,
        expires_days=args.expires_days,
        norm_bounds=bounds,
    )
    print(
        f"exported {manifest.model_id} version {manifest.model_version}: "
        f"{len(manifest.artifacts)} artifacts in {args.out_dir}, "
        f"expires {format_time(manifest.expires_at)}"
    )
    if bounds is not None:
        print(
            f"output-norm bounds calibrated on {calibrated} tokens: "
            + " ".join(f"{li}:{b}={nb.bound:.1f}" for (li, b), nb in sorted(bounds.items()))
        )
    print(f"manifest digest: {manifest_digest(manifest)}")
    print(f"next: mbt sign {args.out_dir} --key PRIVATE.pem")
    return 0
