"""Token selection and incremental generation with a KV cache.

:func:`select_next` is pure (logits in, token out) so the aggregator gateway, which computes
logits from fused layer outputs, picks tokens exactly as the in-process model does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel, StepInfo

MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy decoding (top-k/top-p are then ignored)."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf; sampling there is argmax anyway.
        return self.temperature < MIN_TEMPERATURE


def select_next(logits: Tensor, cfg: SamplingConfig, gen: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def fit_window(
    cached: int, pending: list[int], tokens: list[int], window: int
) -> tuple[bool, list[int]]:
    """What to feed next: ``pending`` after ``cached`` positions, or, when that would pass the
    context ``window``, a restart from the most recent half-window of ``tokens``."""
    if cached + len(pending) <= window:
        return False, pending
    return True, tokens[-(window // 2) :]


@torch.no_grad()
def generate(
    model: MBTLanguageModel,
    prompt: list[int],
    cfg: SamplingConfig,
    masks: list[Tensor] | None = None,
    aggregation: AggregationConfig | None = None,
) -> Iterator[tuple[int, StepInfo]]:
    """Yield ``(token, info)`` per new token: one prefill of the prompt, then one-token steps.

    When the context is full, the cache is rebuilt from the most recent half-context of tokens.
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    model.eval()
    aggregation = aggregation or AggregationConfig()
    device = model.tok_emb.weight.device  # wherever the model was put (mbt generate --device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    window = model.cfg.context_length
    tokens = list(prompt[-window:])
    cache = model.new_cache()
    pending = tokens
    for _ in range(cfg.max_new_tokens):
        restart, pending = fit_window(cache.length, pending, tokens, window)
        if restart:
            cache = model.new_cache()
        info = StepInfo()
        logits = model(torch.tensor([pending], device=device), masks, cache, aggregation, info)
        token = int(select_next(logits[:, -1], cfg, gen)[0])
        yield token, info
        if cfg.stop_at_eos and token == model.cfg.eos_token_id:
            return
        tokens.append(token)
        pending = [token]
