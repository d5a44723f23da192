"""Fine-tune a checkpoint (a trained or an imported one) to degrade gracefully under outages.

Continues training CHECKPOINT with in-place distillation by default: every step trains the
full model on the text's labels and masked sub-models on the full model's soft predictions,
so the healthy model stays what it was while the masked ones learn to stand in for it. The
progress bar shows the validation perplexity healthy and with a quarter of every layer's
branches out. The result (OUT/model.safetensors, float32) exports and serves like any model;
running the same command again resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.cli.commands.train import add_training_arguments, training_config
from mbt_core.training.train import FREEZABLE, train


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p for p in text.split(",") if p)
    unknown = sorted(set(parts) - set(FREEZABLE))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"cannot freeze {', '.join(unknown)}; choose from {', '.join(FREEZABLE)}"
        )
    return parts


def add_block_size_argument(p: argparse.ArgumentParser) -> None:
    """``--block-size``: short training sequences for a long-context (imported) model."""
    p.add_argument(
        "--block-size",
        type=int,
        default=256,
        help="positions per training sequence and validation window (at most the context)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the model to continue from")
    add_training_arguments(p)
    p.add_argument(
        "--freeze",
        type=_parts,
        default=(),
        metavar="PART[,PART...]",
        help=f"keep these fixed: {', '.join(FREEZABLE)} (e.g. trunk)",
    )
    add_block_size_argument(p)
    # A fine-tune starts from trained weights: shorter, gentler, distilling.
    p.set_defaults(
        steps=300, lr=3e-4, min_lr=3e-5, warmup_steps=20, robust_mode="distill", batch_size=8
    )


def run(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        raise ValueError(f"{args.checkpoint}: no such checkpoint file")
    cfg = training_config(
        args, init=args.checkpoint, freeze=args.freeze, block_size=args.block_size
    )
    path = train(cfg, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0
