"""Perplexity, healthy and under simulated outages (whole branches out for the whole text)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.masks import outage_masks


@dataclass(frozen=True)
class OutageResult:
    label: str
    fraction: float
    perplexities: tuple[float, ...]  # one per random mask

    @property
    def mean(self) -> float:
        return sum(self.perplexities) / len(self.perplexities)

    def to_dict(self) -> dict[str, object]:
        return {
            "setting": self.label,
            "fraction_out": self.fraction,
            "perplexity": self.mean,
            "per_mask": list(self.perplexities),
        }


def scored_targets(stream: Tensor, window: int, max_tokens: int | None = None) -> Tensor:
    """The tokens :func:`perplexity` predicts: whole windows of ``window`` positions."""
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_windows = (stream.numel() - 1) // window
    if n_windows == 0:
        raise ValueError(f"text of {stream.numel()} tokens is shorter than one window of {window}")
    return stream[1 : n_windows * window + 1]


def bits_per_char(ppl: float, tokens: int, chars: int) -> float:
    """The same loss per character in bits: comparable across tokenizers."""
    return math.log2(ppl) * tokens / chars


@torch.no_grad()
def perplexity(
    model: MBTLanguageModel,
    stream: Tensor,
    masks: list[Tensor] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    window: int | None = None,
) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``stream`` (the context
    length, or ``window`` positions: a fine-tune of a long-context model scores short ones)."""
    was_training = model.training
    model.eval()
    t = min(window or model.cfg.context_length, model.cfg.context_length)
    y = scored_targets(stream, t, max_tokens)
    n_windows = y.numel() // t
    x = stream[: n_windows * t].view(n_windows, t)
    y = y.view(n_windows, t)
    total = 0.0
    for i in range(0, n_windows, batch_size):
        logits = model(x[i : i + batch_size], masks=masks)
        total += F.cross_entropy(
            logits.flatten(0, 1), y[i : i + batch_size].flatten(), reduction="sum"
        ).item()
    model.train(was_training)
    return math.exp(total / y.numel())


def outage_table(
    model: MBTLanguageModel,
    stream: Tensor,
    fractions: tuple[float, ...] = (0.0, 0.25, 0.5),
    n_masks: int = 4,
    seed: int = 0,
    max_tokens: int | None = None,
) -> list[OutageResult]:
    """Perplexity per outage fraction, averaged over ``n_masks`` random masks (one if healthy)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for fraction in fractions:
        if fraction == 0.0:
            ppls: tuple[float, ...] = (perplexity(model, stream, None, max_tokens=max_tokens),)
            label = "healthy"
        else:
            ppls = tuple(
                perplexity(
                    model,
                    stream,
                    outage_masks(model.cfg.branches, fraction, gen),
                    max_tokens=max_tokens,
                )
                for _ in range(n_masks)
            )
            label = f"{round(fraction * 100)}% out"
        rows.append(OutageResult(label, fraction, ppls))
    return rows
