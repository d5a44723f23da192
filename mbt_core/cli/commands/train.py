"""Train an MBT language model for partial availability (branch dropout + entropy floor).

Resumes automatically when OUT already holds a checkpoint and trainer state from an earlier run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbt_core.model.config import ModelConfig
from mbt_core.model.decoder import UnsupportedModel, swiglu_decoder
from mbt_core.training.data import default_corpus_path
from mbt_core.training.objective import ROBUST_MODES
from mbt_core.training.train import TrainConfig, train


def _branches(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K,K,... got {text!r}") from None


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The data, optimizer, objective and evaluation flags (``mbt train`` and ``finetune``)."""
    d = TrainConfig.__dataclass_fields__
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a .txt file or a folder of them (default: the shipped Shakespeare corpus)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoint and state")
    p.add_argument("--steps", type=int, default=d["steps"].default, help="optimizer steps in all")
    p.add_argument(
        "--batch-size", type=int, default=d["batch_size"].default, help="sequences per step"
    )
    p.add_argument("--lr", type=float, default=d["lr"].default, help="peak learning rate (AdamW)")
    p.add_argument(
        "--min-lr",
        type=float,
        default=d["min_lr"].default,
        help="learning rate at the end of the cosine decay",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=d["warmup_steps"].default, help="linear warmup steps"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"].default,
        help="AdamW weight decay of matrices",
    )
    p.add_argument(
        "--grad-clip", type=float, default=d["grad_clip"].default, help="gradient norm clip"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d["seed"].default,
        help="seed of initialization, batches and masks",
    )
    p.add_argument(
        "--branch-drop",
        type=float,
        default=d["branch_drop"].default,
        help="probability a branch is out in a step; 0 disables branch dropout",
    )
    p.add_argument(
        "--mask-per",
        choices=("step", "sequence"),
        default=d["mask_per"].default,
        help="draw branch masks per step (dropped branches skipped) or per sequence",
    )
    p.add_argument(
        "--robust-mode",
        choices=ROBUST_MODES,
        default=d["robust_mode"].default,
        help="dropout: train masked models on the labels; distill: train the full model on "
        "the labels and --submodels masked ones on its soft predictions (sandwich rule)",
    )
    p.add_argument(
        "--submodels",
        type=int,
        default=d["submodels"].default,
        help="masked sub-models per step under --robust-mode distill",
    )
    p.add_argument(
        "--distill-fraction",
        type=float,
        default=d["distill_fraction"].default,
        help="fraction of each batch's sequences every sub-model re-runs (its cost)",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=d["distill_temperature"].default,
        help="softmax temperature of the distillation KL",
    )
    p.add_argument(
        "--entropy-floor",
        type=float,
        default=d["entropy_floor"].default,
        help="minimum H(alpha) as a fraction of log K (minimum participation)",
    )
    p.add_argument(
        "--entropy-weight",
        type=float,
        default=d["entropy_weight"].default,
        help="weight of the entropy-floor penalty; 0 disables it",
    )
    p.add_argument(
        "--eval-interval",
        type=int,
        default=d["eval_interval"].default,
        help="steps between validation perplexities",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=d["eval_tokens"].default,
        help="validation tokens scored each time",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=d["checkpoint_interval"].default,
        help="steps between checkpoints",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def training_config(args: argparse.Namespace, **extra: object) -> TrainConfig:
    """The TrainConfig of the shared flags; ``extra`` sets the rest (model, init, ...)."""
    return TrainConfig(
        data=args.data or default_corpus_path(),
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        branch_drop=args.branch_drop,
        mask_per=args.mask_per,
        robust_mode=args.robust_mode,
        submodels=args.submodels,
        distill_temperature=args.distill_temperature,
        distill_fraction=args.distill_fraction,
        entropy_floor=args.entropy_floor,
        entropy_weight=args.entropy_weight,
        eval_interval=args.eval_interval,
        eval_tokens=args.eval_tokens,
        checkpoint_interval=args.checkpoint_interval,
        **extra,  # type: ignore[arg-type]
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p)
    m = ModelConfig()
    p.add_argument("--vocab-size", type=int, default=m.vocab_size, help="BPE vocabulary size")
    p.add_argument("--d-model", type=int, default=m.d_model, help="model width")
    p.add_argument("--heads", type=int, default=m.n_heads, help="attention heads")
    p.add_argument("--context", type=int, default=m.context_length, help="context length in tokens")
    p.add_argument("--layers", type=int, default=m.n_layers, help="MBT layers")
    p.add_argument(
        "--branches",
        type=_branches,
        default=(m.branches[0],),
        help="branches per layer: K for every layer, or K,K,... one per layer",
    )
    p.add_argument(
        "--blocks-per-branch",
        type=int,
        default=m.blocks_per_branch,
        help="transformer blocks in each branch",
    )
    p.add_argument(
        "--dropout", type=float, default=m.dropout, help="ordinary dropout inside blocks"
    )
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="block",
        help="block: every branch a whole pre-LN block (learned positions, GELU); parallel: "
        "every branch a width slice of a parallel-residual block (RMSNorm, rotary, SwiGLU)",
    )
    p.add_argument(
        "--mlp-hidden",
        type=int,
        default=None,
        help="--arch parallel: SwiGLU neurons per layer, split over its branches "
        "(default 3 x d-model)",
    )


ARCHS = ("block", "parallel")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The architecture the model flags describe (the vocabulary is the tokenizer's later)."""
    branches = args.branches * args.layers if len(args.branches) == 1 else args.branches
    if args.arch == "block":
        if args.mlp_hidden is not None:
            raise ValueError("--mlp-hidden applies to --arch parallel")
        return ModelConfig(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_heads=args.heads,
            context_length=args.context,
            n_layers=args.layers,
            branches=branches,
            blocks_per_branch=args.blocks_per_branch,
            dropout=args.dropout,
        )
    if len(set(branches)) != 1 or args.blocks_per_branch != 1 or args.dropout:
        raise ValueError(
            "--arch parallel takes one K for every layer, one block per branch and no --dropout"
        )
    spec = swiglu_decoder(
        args.vocab_size,
        args.d_model,
        args.heads,
        args.layers,
        args.mlp_hidden or 3 * args.d_model,
        args.context,
    )
    try:
        return ModelConfig.sliced(spec, branches[0], args.context, "float32", eos=0)
    except UnsupportedModel as err:  # the split check speaks of imports: say it for training
        raise ValueError(f"--arch parallel: {err}") from None


def run(args: argparse.Namespace) -> int:
    cfg = training_config(args, model=model_config(args))
    path = train(cfg, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0
