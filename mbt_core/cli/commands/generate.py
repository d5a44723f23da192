"""Generate text from a prompt, optionally with branches taken out to simulate outages.

Prints the prompt and the continuation on stdout; with --show-branches, one line per token on
stderr tells which branches of every layer were used (1), missing (0), rejected (x) or
answered by a hedged second replica (h). With --gateway, the distributed model answers.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mbt_core.cli.commands.common import add_model_arguments, load_model
from mbt_core.cli.flags import add_gateway_client_arguments, gateway_credentials
from mbt_core.devices import open_device
from mbt_core.model.config import AggregationConfig
from mbt_core.model.masks import describe, parse_drop_spec, training_masks
from mbt_core.model.sampling import SamplingConfig, generate


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SamplingConfig()
    p.add_argument("prompt", help="text to continue, e.g. 'ROMEO:'")
    add_model_arguments(p)
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="stop after this many tokens"
    )
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 means greedy")
    p.add_argument(
        "--greedy", action="store_true", help="greedy decoding (same as --temperature 0)"
    )
    p.add_argument(
        "--top-k", type=int, default=d.top_k, help="sample among the k likeliest (0: off)"
    )
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling and --drop-rate seed")
    p.add_argument(
        "--drop",
        default="",
        metavar="L:B,...",
        help="branches to take out, as layer:branch pairs (e.g. 0:1,3:2)",
    )
    p.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="take each branch out with probability P (at least one kept per layer)",
    )
    p.add_argument("--aggregation", choices=("mean", "trimmed", "median"), default="mean")
    p.add_argument(
        "--device", default="cpu", help="where the in-process model runs: cpu or cuda[:N]"
    )
    add_gateway_client_arguments(
        p, help="generate through a running mbt-aggregator instead of in this process"
    )
    p.add_argument(
        "--show-branches",
        action="store_true",
        help="print per token which branches every layer used (stderr)",
    )


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )


def run_remote(args: argparse.Namespace) -> int:
    """Generate through a gateway; the CLI is the composition root that may reach it."""
    from mbt_core.wire.gateway_client import describe_layers, generate_remote

    if args.drop or args.drop_rate or args.artifacts or args.checkpoint or args.device != "cpu":
        raise ValueError(
            "--gateway serves its own model: --drop, --drop-rate, --checkpoint, --artifacts "
            "and --device do not apply"
        )
    sys.stdout.write(args.prompt)
    credentials = gateway_credentials(args)
    for event in generate_remote(
        args.gateway, args.prompt, _sampling(args), credentials=credentials
    ):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        if args.show_branches:
            print(
                f"\n[token {event.index}] {describe_layers(event)}  {event.latency_ms:.1f} ms",
                file=sys.stderr,
            )
    sys.stdout.write("\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.gateway:
        return run_remote(args)
    device = open_device(args.device)  # before loading: a missing GPU fails at once
    ckpt = load_model(args)
    model, tok = ckpt.model.to(device), ckpt.tokenizer
    if args.drop and args.drop_rate:
        raise ValueError("use either --drop or --drop-rate, not both")
    masks = None
    if args.drop:
        masks = parse_drop_spec(args.drop, model.cfg.branches)
    elif args.drop_rate:
        if not 0.0 < args.drop_rate < 1.0:
            raise ValueError(f"--drop-rate must be in (0, 1), got {args.drop_rate}")
        gen = torch.Generator().manual_seed(args.seed)
        masks = training_masks(model.cfg.branches, args.drop_rate, gen)
    if masks is not None:
        print(f"branches present: {describe(masks)}", file=sys.stderr)
    sampling = _sampling(args)
    prompt = tok.encode(args.prompt)
    sys.stdout.write(args.prompt)
    produced: list[int] = []
    shown = ""
    for n, (token, info) in enumerate(
        generate(model, prompt, sampling, masks, AggregationConfig(mode=args.aggregation))
    ):
        if token == tok.eos_id:
            break
        produced.append(token)
        text = tok.decode(produced)  # decode the whole tail: BPE pieces may split characters
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
        if args.show_branches:
            used = [r.accepted.reshape(r.accepted.shape[0], -1)[:, -1] for r in info.layers]
            print(f"\n[token {n}] {describe(used)}", file=sys.stderr)
    sys.stdout.write("\n")
    return 0
