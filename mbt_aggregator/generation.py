"""Generation and scoring through the swarm: the trunk runs here, every layer fans out.

The decoding loop mirrors ``mbt_core.model.sampling.generate`` step for step (same window rule,
same token selection, same seeded generator), so with every branch healthy the tokens are
exactly the in-process model's.

:class:`Gateway` is what the gateway serves, below gRPC: a client's requests checked against
the limits (an :class:`~mbt_core.errors.InvalidRequest` otherwise), run through the engine,
timed and counted; the servicer only translates its messages and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mbt_aggregator.config import GatewayLimits
from mbt_aggregator.engine import Engine
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.reports import MASKED, LayerReport
from mbt_aggregator.session import Session
from mbt_core.errors import InvalidRequest, QuorumNotReached
from mbt_core.model.sampling import SamplingConfig, fit_window, select_next
from mbt_core.model.tokenizer import Tokenizer

MAX_LOGPROB_BYTES = 256 << 20  # Score with return_logprobs sends (tokens, vocab) float32
DEFAULT_NEW_TOKENS = 100
# What mbt_requests_failed_total counts a failed request as, by its error; any other error is
# "internal" (a fault of the gateway or the swarm, never of the client).
FAILURE_REASON: dict[type[Exception], str] = {
    InvalidRequest: "invalid",
    QuorumNotReached: "quorum",
}
INTERNAL = "internal"
FAILURE_REASONS = (*FAILURE_REASON.values(), INTERNAL)
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


async def read_ahead(source: AsyncIterator[T], depth: int) -> AsyncGenerator[T, None]:
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
    gen = torch.Generator(device=engine.device).manual_seed(cfg.seed)
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
        target = torch.tensor(chunk[1:], device=logits.device)
        total -= F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        masked += sum(b.outcome == MASKED for r in reports for b in r.branches)
        if return_logprobs:
            rows.append(F.log_softmax(logits.float(), dim=-1).cpu())  # (T, V)
    return ScoreResult(total, count, masked, torch.cat(rows) if rows else None)


@dataclass(frozen=True)
class GenerateRequest:
    """A client's generation request; ``None`` takes the default (top-k and top-p: none)."""

    prompt: str
    max_new_tokens: int | None = None
    temperature: float = SamplingConfig.temperature
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class TextEvent:
    """One generated token with the text it adds (BPE pieces may hold part of a character:
    the text then comes with a later token) and what each layer's branches did."""

    index: int
    token: int
    text: str
    layers: tuple[LayerReport, ...]
    seconds: float
    prompt_tokens: int = 0  # the prompt's length as encoded (what the HTTP API counts in usage)


class Gateway:
    """Generation and scoring requests, as the gateway serves them to its clients."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, limits: GatewayLimits, metrics: Metrics
    ) -> None:
        self.engine, self.tokenizer, self.limits, self.metrics = engine, tokenizer, limits, metrics
        for reason in FAILURE_REASONS:  # every series from the start, at 0
            metrics.requests_failed.labels(reason=reason)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TextEvent, None]:
        """The tokens of ``request``, one event each, timed (first token, every token)."""
        metrics = self.metrics
        with self._counted():
            cfg, prompt = self._checked(request)
            t0 = time.perf_counter()
            produced: list[int] = []
            shown = ""
            async for event in generate_tokens(self.engine, prompt, cfg):
                if event.index == 0:
                    metrics.ttft.observe(time.perf_counter() - t0)
                metrics.token_latency.observe(event.seconds)
                metrics.tokens.inc()
                text = ""
                if event.token != self.tokenizer.eos_id:
                    produced.append(event.token)
                    full = self.tokenizer.decode(produced)
                    text, shown = full[len(shown) :], full
                yield TextEvent(
                    event.index, event.token, text, event.layers, event.seconds, len(prompt)
                )

    async def score(self, text: str, return_logprobs: bool = False) -> ScoreResult:
        """``text`` scored as ``mbt eval`` scores it (see :func:`score`)."""
        with self._counted():
            ids = self.tokenizer.encode(text)
            limit = self.limits.max_score_tokens
            if len(ids) < 2 or len(ids) > limit:
                raise InvalidRequest(f"text must encode to 2..{limit} tokens, got {len(ids)}")
            vocab = self.engine.trunk.cfg.vocab_size
            if return_logprobs and (len(ids) - 1) * vocab * 4 > MAX_LOGPROB_BYTES:
                raise InvalidRequest(
                    f"log-probabilities of {len(ids) - 1} positions x {vocab} tokens exceed "
                    f"{MAX_LOGPROB_BYTES >> 20} MiB: score a shorter text"
                )
            return await score(self.engine, ids, return_logprobs)

    def _checked(self, request: GenerateRequest) -> tuple[SamplingConfig, list[int]]:
        """The sampling settings and prompt tokens of ``request``, within the limits."""
        limits = self.limits
        try:
            wanted = request.max_new_tokens
            if wanted is not None and wanted > limits.max_new_tokens:
                raise ValueError(
                    f"max_new_tokens {wanted} exceeds the limit of {limits.max_new_tokens}"
                )
            cfg = SamplingConfig(
                max_new_tokens=request.max_new_tokens or DEFAULT_NEW_TOKENS,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                seed=request.seed,
            )
            if not 0 <= request.seed < 1 << 64:
                raise ValueError(f"seed must be in 0..2**64-1, got {request.seed}")
            prompt = self.tokenizer.encode(request.prompt)
        except ValueError as exc:  # the sampling settings' own checks, too
            raise InvalidRequest(str(exc)) from exc
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) > limits.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt of {len(prompt)} tokens exceeds the limit of {limits.max_prompt_tokens}"
            )
        return cfg, prompt

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count a request that fails, by its reason. A client that goes away (cancellation,
        a closed stream: not an ``Exception``) is no failure."""
        try:
            yield
        except Exception as exc:
            reasons = (FAILURE_REASON[c] for c in type(exc).__mro__ if c in FAILURE_REASON)
            self.metrics.requests_failed.labels(reason=next(reasons, INTERNAL)).inc()
            raise
