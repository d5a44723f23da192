"""Calibrated output-norm bounds per branch, and the check a gateway applies with them.

A healthy branch's output is the residual stream plus its blocks' updates, so its per-position
L2 norm stays in a band the exported model shows on ordinary text. Export measures that band
on calibration text and signs a bound per branch into the manifest. The gateway then clips an
output row whose norm is somewhat above the bound and rejects (masks) one far above it or
holding NaN/Inf, so a broken or hostile branch cannot steer the fused sum, without needing the
other branches' outputs to compare with. The bound has headroom (``margin``) over the largest
calibrated norm, so healthy outputs on new text pass through bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mbt_core.artifacts.manifest import NormBound
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.training.data import evaluation_texts, token_stream

if TYPE_CHECKING:
    from mbt_core.model.checkpoint import Checkpoint

DEFAULT_LEVEL = 0.999  # the quantile recorded beside the maximum
DEFAULT_MARGIN = 2.0  # bound = margin x largest calibrated norm; unseen text reached 1.25x
DEFAULT_REJECT_FACTOR = 4.0  # k: rows above k x bound are rejected, not clipped
DEFAULT_TOKENS = 4096  # enough positions for a stable maximum, a second or two on a CPU
_BATCH_WINDOWS = 16
_CHARS_PER_TOKEN = 8  # generous: BPE tokens average 3-4 characters of English text


def calibration_tokens(
    tokenizer: Tokenizer, texts: list[str], max_tokens: int = DEFAULT_TOKENS
) -> Tensor:
    """The first ``max_tokens`` tokens of ``texts``, encoding only as much text as needed."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    text = "\n".join(texts)[: max_tokens * _CHARS_PER_TOKEN]
    if not text.strip():
        raise ValueError("the calibration text is empty")
    return token_stream(tokenizer, [text])[:max_tokens]


def calibration_windows(token_ids: Tensor, context_length: int) -> Tensor:
    """A 1-D token stream as (N, T) windows of the context length (a short stream: one)."""
    if token_ids.dim() == 2:
        return token_ids
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"calibration needs a non-empty 1-D token stream, got {token_ids.shape}")
    n = token_ids.numel() // context_length
    if n == 0:
        return token_ids[None]
    return token_ids[: n * context_length].view(n, context_length)


@torch.no_grad()
def branch_output_norms(
    model: MBTLanguageModel, token_ids: Tensor
) -> dict[tuple[int, int], Tensor]:
    """(layer, branch) -> per-position L2 norms of that branch's output, over ``token_ids``.

    The model runs as in one process (every branch present, plain weighted mean); hooks read
    each branch's output on its way into the aggregation.
    """
    windows = calibration_windows(token_ids, model.cfg.context_length)
    norms: dict[tuple[int, int], list[Tensor]] = {}
    handles = []
    for li, layer in enumerate(model.layers):
        for b, branch in enumerate(layer.branches):

            def record(_m: object, _i: object, out: Tensor, key: tuple[int, int] = (li, b)) -> None:
                norms.setdefault(key, []).append(
                    torch.linalg.vector_norm(out.float(), dim=-1).flatten()
                )

            handles.append(branch.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(_BATCH_WINDOWS):
            model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in norms.items()}


def branch_norm_bounds(
    model: MBTLanguageModel,
    token_ids: Tensor,
    *,
    level: float = DEFAULT_LEVEL,
    margin: float = DEFAULT_MARGIN,
) -> dict[tuple[int, int], NormBound]:
    """(layer, branch) -> its calibrated :class:`NormBound` (``.bound`` is the float to use)."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    if not (math.isfinite(margin) and margin >= 1.0):
        raise ValueError(f"margin must be >= 1, got {margin}")
    bounds = {}
    for key, norms in branch_output_norms(model, token_ids).items():
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"branch {key} gives non-finite outputs on the calibration text")
        top = float(norms.max())
        bounds[key] = NormBound(
            bound=top * margin,
            max_norm=top,
            quantile_norm=min(top, float(torch.quantile(norms.double(), level))),
            level=level,
        )
    return bounds


def check_outputs(
    outputs: Tensor, bound: float, k: float = DEFAULT_REJECT_FACTOR
) -> tuple[Tensor, Tensor]:
    """Apply a branch's bound to its ``outputs`` (N, C) (any leading row shape works).

    Returns ``(clipped, rejected)``: ``rejected`` (N,) marks rows holding NaN/Inf or with a
    norm above ``k * bound``; rows with a norm in ``(bound, k * bound]`` are scaled down to the
    bound (up to rounding in the output dtype); rejected rows are zeroed (never to be read);
    every other row comes back bit for bit, and ``outputs`` itself when nothing changed.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {bound}")
    if not (math.isfinite(k) and k >= 1.0):
        raise ValueError(f"k must be a finite number >= 1, got {k}")
    if outputs.dim() < 1:
        raise ValueError("outputs must have shape (N, C)")
    norms = torch.linalg.vector_norm(outputs.float(), dim=-1)  # (N,)
    rejected = ~torch.isfinite(outputs).all(-1) | ~(norms <= k * bound)
    over = (norms > bound) & ~rejected
    if not bool(over.any() or rejected.any()):
        return outputs, rejected
    scale = torch.where(over, bound / norms, torch.ones_like(norms))  # (N,)
    scaled = (outputs.float() * scale[..., None]).to(outputs.dtype)
    clipped = torch.where(over[..., None], scaled, outputs)
    clipped = torch.where(rejected[..., None], torch.zeros_like(outputs), clipped)
    return clipped, rejected


def calibrated_bounds(
    ckpt: Checkpoint,
    text: Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    margin: float = DEFAULT_MARGIN,
) -> tuple[dict[tuple[int, int], NormBound], int]:
    """Every branch's output-norm bound from ``text`` (default: the shipped validation works),
    and the number of tokens they were calibrated on."""
    ids = calibration_tokens(ckpt.tokenizer, evaluation_texts(text), tokens)
    return branch_norm_bounds(ckpt.model, ids, margin=margin), ids.numel()
