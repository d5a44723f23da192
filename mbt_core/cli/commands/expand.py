"""Grow layers of a trained model by new branches and train only those.

Adds --add branches to each of --layers (default: every layer) of CHECKPOINT and trains just
the new branches and their alpha logits; the trunk, every old branch and the old alpha logits
stay bit for bit as they were, so an export of the result keeps every old branch's artifact
(and hash) and a serving gateway can ramp the new branches in (the manifest's expansion,
--beta-start/--beta-target/--ramp-s). Training is the robust objective of `mbt train`:
branch dropout per sequence over all branches of a layer, old and new alike, and the entropy
floor. Writes OUT/model.safetensors and prints the validation perplexity before and after;
running the same command again resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mbt_core.artifacts.export import EXPANSION_INFO
from mbt_core.artifacts.manifest import Expansion
from mbt_core.cli.commands.finetune import add_block_size_argument
from mbt_core.cli.commands.train import add_training_arguments, training_config
from mbt_core.errors import MbtError
from mbt_core.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mbt_core.model.expand import (
    DEFAULT_NOISE,
    INITS,
    changed_parameters,
    expand_model,
    new_branch_mass,
)
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.training.data import read_texts, split_texts, token_stream
from mbt_core.training.evaluate import perplexity
from mbt_core.training.train import in_dtype, train


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(li) for li in text.split(",") if li.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 0,2, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the trained model to grow")
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        metavar="L[,L...]",
        help="layers to grow (default: every layer)",
    )
    p.add_argument("--add", type=int, required=True, help="new branches per grown layer")
    p.add_argument(
        "--init",
        choices=INITS,
        default="copy",
        help="copy: each new branch a noisy copy of an old one (largest alpha first); "
        "fresh: newly initialized",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=DEFAULT_NOISE,
        help="--init copy: Gaussian noise in units of each tensor's std",
    )
    add_training_arguments(p)
    add_block_size_argument(p)
    g = p.add_argument_group("the live ramp (signed into the manifest by mbt export)")
    g.add_argument("--beta-start", type=float, default=0.0, help="injection rate to start at")
    g.add_argument("--beta-target", type=float, default=1.0, help="injection rate to end at")
    g.add_argument("--ramp-s", type=float, default=120.0, help="seconds from start to target")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    # Only the new branches learn, from a trained model: a short run at a middling rate.
    p.set_defaults(steps=300, lr=1e-3, min_lr=1e-4, warmup_steps=20, robust_mode="dropout")


def run(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        raise ValueError(f"{args.checkpoint}: no such checkpoint file")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    base = load_checkpoint(args.checkpoint)
    cfg = base.model.cfg
    layers = args.layers if args.layers is not None else tuple(range(cfg.n_layers))
    grown = expand_model(
        base.model, layers, args.add, init=args.init, noise=args.noise, seed=args.seed
    )
    expansion = Expansion(cfg.branches, args.beta_start, args.beta_target, args.ramp_s)
    expansion.check_config(grown.cfg)
    info = (
        (EXPANSION_INFO, json.dumps(expansion.to_dict(), sort_keys=True)),
        ("expanded_from", args.checkpoint.name),
        ("expand_init", args.init),
    )
    tcfg = training_config(args, block_size=args.block_size, grow_from=cfg.branches, info=info)
    val = token_stream(base.tokenizer, split_texts(read_texts(tcfg.data))[1])

    def ppl(model: MBTLanguageModel) -> float:
        return perplexity(model, val, max_tokens=tcfg.eval_tokens, window=tcfg.block_size)

    before, at_init = ppl(base.model), ppl(grown)
    path = train(tcfg, not args.no_progress, start=Checkpoint(grown, base.tokenizer, base.info))
    done = load_checkpoint(path)
    trained = in_dtype(done.model, cfg.dtype)  # training ran in float32: the old bytes back
    changed = changed_parameters(base.model, trained)
    if changed:
        raise MbtError(f"training changed old weights ({', '.join(changed[:3])}); not written")
    if trained is not done.model:
        save_checkpoint(path, trained, done.tokenizer, done.info)
    mass = " ".join(f"{m:.3f}" for m in new_branch_mass(trained, cfg.branches))
    print(f"validation perplexity ({tcfg.eval_tokens} tokens):")
    print(f"  base model {cfg.branches}: {before:.3f}")
    print(f"  grown {trained.cfg.branches}, untrained ({args.init}): {at_init:.3f}")
    print(f"  grown, trained: {ppl(trained):.3f}")
    print(f"new branches' alpha mass per layer: {mass}")
    print(f"checkpoint: {path}")
    return 0
