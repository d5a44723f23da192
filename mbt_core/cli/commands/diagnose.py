"""Width diagnostics per layer: effective paths, starvation, concentration, branch diversity.

Heuristics: a starvation index above 0.6, fewer than 2 effective paths or a top-1 share above
0.7 mean width has collapsed toward one path; a high branch correlation means the branches are
redundant and add little under outages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mbt_core.cli.commands.common import add_model_arguments, load_model
from mbt_core.training.data import evaluation_texts, token_stream
from mbt_core.training.diagnostics import diagnose

_COLUMNS = (
    ("eff_paths", "effective_num_paths"),
    ("starve", "path_starvation_index"),
    ("top1", "top1_share"),
    ("margin", "margin_top1_top2"),
    ("gini", "gini_concentration"),
    ("cos_dist", "diversity_cosine_distance_mean"),
    ("corr", "branch_correlation_mean"),
    ("energy_cv", "output_energy_cv"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text",
        type=Path,
        default=None,
        help="sample text (default: the validation works of the shipped corpus)",
    )
    add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=2048, help="how many tokens of the sample to use")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    ckpt = load_model(args)
    t = ckpt.model.cfg.context_length
    stream = token_stream(ckpt.tokenizer, evaluation_texts(args.text))[: max(args.tokens, t)]
    n = stream.numel() // t
    if n == 0:
        raise ValueError(f"the sample has {stream.numel()} tokens, fewer than one window of {t}")
    report = diagnose(ckpt.model, stream[: n * t].view(n, t))
    if args.json:
        print(json.dumps([r.to_dict() for r in report], indent=2))
        return 0
    print(f"{'layer':<6}{'K':>3} " + " ".join(f"{c:>9}" for c, _ in _COLUMNS) + "  weights")
    for r in report:
        d = r.to_dict()
        cells = " ".join(f"{d[key]:>9.3f}" for _, key in _COLUMNS)
        print(f"{r.layer:<6}{r.branches:>3} {cells}  {' '.join(f'{w:.3f}' for w in r.weights)}")
    return 0
