"""Generation and scoring through the swarm: the trunk runs here, every layer fans out.

The decoding loop mirrors ``mbt_core.sampling.generate`` step for step (same window rule,
same token selection, same seeded generator), so with every branch healthy the tokens are
exactly the in-process model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mbt_aggregator.engine import MASKED, Engine, LayerReport
from mbt_aggregator.session import Session
from mbt_core.model.sampling import SamplingConfig, fit_window, select_next

_background: set[asyncio.Task[None]] = set()
T = TypeVar("T")


@dataclass(frozen=True)
class TokenEvent:
    index: int
    token: int
    layers: tuple[LayerReport, ...]
    seconds: float


@dataclass(frozen=True)
class ScoreResult:
    log_likelihood: float
    tokens: int
    masked_branch_steps: int
    logprobs: Tensor | None = None  # (tokens, V) next-token log-probabilities, when asked for

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood / self.tokens) if self.tokens else float("nan")


async def forward_layers(
    engine: Engine, session: Session, ids: list[int], position: int
) -> tuple[Tensor, list[LayerReport]]:
    """Logits (T, V) of ``ids`` at ``position..``: embed, every layer across the swarm, head."""
    return await engine.run_token(session, ids, position)


async def read_ahead(source: AsyncIterator[T], depth: int) -> AsyncIterator[T]:
    """``source``'s items, produced by a task of their own up to ``depth`` ahead of the
    consumer: a generation goes on with its next token while the last one is being sent (a
    stream write waits for its completion). The source's exception is raised here in order;
    when the consumer stops early, the source is cancelled (its ``finally`` runs)."""
    queue: asyncio.Queue[tuple[T | None, BaseException | None, bool]] = asyncio.Queue(depth)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((item, None, False))
        except Exception as exc:
            await queue.put((None, exc, True))
        else:
            await queue.put((None, None, True))

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            item, error, last = await queue.get()
            if error is not None:
                raise error
            if last:
                return
            yield item  # type: ignore[misc]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _end_later(engine: Engine, session: Session) -> None:
    """End a session without blocking (also when the caller is being cancelled)."""
    task = asyncio.get_running_loop().create_task(engine.end_session(session))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def generate_tokens(
    engine: Engine, prompt: list[int], cfg: SamplingConfig
) -> AsyncIterator[TokenEvent]:
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    window = engine.trunk.cfg.context_length
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = list(prompt[-window:])
    pending = tokens
    session, position = await engine.open_session(), 0
    try:
        for index in range(cfg.max_new_tokens):
            restart, pending = fit_window(position, pending, tokens, window)
            if restart:
                _end_later(engine, session)
                session, position = await engine.open_session(), 0
            t0 = time.perf_counter()
            logits, reports = await forward_layers(engine, session, pending, position)
            token = int(select_next(logits[-1:], cfg, gen)[0])
            position += len(pending)
            yield TokenEvent(index, token, tuple(reports), time.perf_counter() - t0)
            if cfg.stop_at_eos and token == engine.trunk.cfg.eos_token_id:
                return
            tokens.append(token)
            pending = [token]
    finally:
        _end_later(engine, session)


async def score(engine: Engine, ids: list[int], return_logprobs: bool = False) -> ScoreResult:
    """Log-likelihood of ``ids`` in non-overlapping context windows, as ``mbt eval`` scores;
    with ``return_logprobs`` also every predicted position's distribution (outage quality)."""
    window = engine.trunk.cfg.context_length
    total, count, masked = 0.0, 0, 0
    rows: list[Tensor] = []
    for start in range(0, max(0, len(ids) - 1), window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        session = await engine.open_session()
        try:
            logits, reports = await forward_layers(engine, session, chunk[:-1], 0)
        finally:
            _end_later(engine, session)
        target = torch.tensor(chunk[1:])
        total -= F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        masked += sum(b.outcome == MASKED for r in reports for b in r.branches)
        if return_logprobs:
            rows.append(F.log_softmax(logits.float(), dim=-1))  # (T, V)
    return ScoreResult(total, count, masked, torch.cat(rows) if rows else None)
