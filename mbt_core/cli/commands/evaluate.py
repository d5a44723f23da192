"""Perplexity of a text, healthy and with a fraction of every layer's branches out.

Each outage setting removes exactly that fraction of branches per layer for the whole text and
averages over several random masks. Without TEXT_FILE, the held-out validation works of the
shipped corpus are used (the split the shipped model was trained with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mbt_core.cli.commands.common import add_model_arguments, load_model
from mbt_core.cli.flags import add_gateway_client_arguments, gateway_credentials
from mbt_core.training.data import evaluation_texts, token_stream
from mbt_core.training.evaluate import bits_per_char, outage_table, scored_targets


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected fractions like 0,0.25,0.5, got {text!r}"
        ) from None
    if any(not 0.0 <= f < 1.0 for f in values):
        raise argparse.ArgumentTypeError("outage fractions must be in [0, 1)")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "text_file",
        nargs="?",
        type=Path,
        default=None,
        help="text to score (default: the validation works Tempest + Macbeth)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--fractions",
        type=_fractions,
        default=(0.0, 0.25, 0.5),
        help="outage fractions per layer (default 0,0.25,0.5)",
    )
    p.add_argument("--masks", type=int, default=4, help="random masks per outage setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_gateway_client_arguments(
        p, help="score through a running mbt-aggregator (the live distributed model)"
    )


def run_remote(args: argparse.Namespace) -> int:
    """Perplexity of the distributed model as it is now (its outages are real ones)."""
    from mbt_core.wire.gateway_client import score_remote

    if args.artifacts or args.checkpoint:
        raise ValueError(
            "--gateway serves its own model: --checkpoint and --artifacts do not apply"
        )
    texts = evaluation_texts(args.text_file)
    text = "\n".join(texts)
    reply = score_remote(args.gateway, text, credentials=gateway_credentials(args))
    if args.json:
        print(
            json.dumps(
                {
                    "gateway": args.gateway,
                    "tokens": reply.tokens,
                    "perplexity": reply.perplexity,
                    "masked_branch_steps": reply.masked_branch_steps,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'setting':<10} {'perplexity':>10} {'tokens':>8} {'masked branch-steps':>20}")
    print(
        f"{'gateway':<10} {reply.perplexity:>10.3f} {reply.tokens:>8} "
        f"{reply.masked_branch_steps:>20}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.gateway:
        return run_remote(args)
    ckpt = load_model(args)
    stream = token_stream(ckpt.tokenizer, evaluation_texts(args.text_file))
    rows = outage_table(ckpt.model, stream, args.fractions, args.masks, args.seed, args.max_tokens)
    healthy = next((r.mean for r in rows if r.fraction == 0.0), None)
    targets = scored_targets(stream, ckpt.model.cfg.context_length, args.max_tokens)
    chars = len(ckpt.tokenizer.decode(targets.tolist()))
    bpc = [bits_per_char(r.mean, targets.numel(), chars) for r in rows]
    if args.json:
        results = [{**r.to_dict(), "bits_per_char": b} for r, b in zip(rows, bpc, strict=True)]
        print(
            json.dumps(
                {"tokens": targets.numel(), "characters": chars, "results": results}, indent=2
            )
        )
        return 0
    print(f"{'setting':<10} {'perplexity':>10} {'vs healthy':>11} {'bits/char':>10} {'masks':>6}")
    for r, b in zip(rows, bpc, strict=True):
        rel = f"{(r.mean / healthy - 1) * 100:+.2f}%" if healthy else "-"
        print(f"{r.label:<10} {r.mean:>10.3f} {rel:>11} {b:>10.4f} {len(r.perplexities):>6}")
    print(f"({targets.numel()} tokens, {chars} characters)")
    return 0
