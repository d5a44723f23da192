"""The fixed workload: greedy generations streamed from the gateway, plus one scored text.

``streams`` clients each send the prompts in turn (greedy, ``max_new_tokens`` each) until
``duration_s`` has passed, and longer (by at most ``recovery_grace_s``) while a scheduled
recovery has not yet shown in the tokens, so that a slow restart is measured rather than cut
off. Every token is recorded on arrival with the per-layer info the gateway streams: which
nodes answered, how many branches were masked, the weight lost. The perplexity text is scored
(with log-probabilities, for the KL divergence) right after the first timed fault, while it is
in force, or half-way through a run without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import grpc
import numpy as np

from mbt_core.wire.codec import decode
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

PROMPTS = ("ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:")
_TEXT_START = "ACT 1\nSCENE 1"  # The Tempest: a validation play, never seen in training
_FAILURE_BACKOFF_S = 0.2  # a client whose request failed waits this before the next


def perplexity_text(chars: int) -> str:
    """A fixed excerpt of The Tempest (shipped, held out of training)."""
    path = resources.files("mbt_core") / "assets" / "shakespeare" / "tempest_gut.txt"
    text = path.read_text(encoding="utf-8")
    start = text.index(_TEXT_START)
    return text[start : start + chars]


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 24
    streams: int = 2  # concurrent clients
    duration_s: float = 10.0
    recovery_grace_s: float = 8.0  # longest extension while a recovery is not yet seen
    text_chars: int = 1200  # ~330 tokens: 3 context windows of the shipped model
    request_timeout_s: float = 60.0  # per Generate/Score call from the bench

    def __post_init__(self) -> None:
        if not self.prompts or self.max_new_tokens <= 0 or self.streams <= 0:
            raise ValueError("a workload needs prompts, max_new_tokens > 0 and streams > 0")
        if self.duration_s <= 0 or self.recovery_grace_s < 0 or self.text_chars < 16:
            raise ValueError("duration_s must be > 0, recovery_grace_s >= 0, text_chars >= 16")


QUICK = Workload(prompts=PROMPTS[:2], max_new_tokens=12, duration_s=5.0, text_chars=500)


@dataclass(frozen=True)
class TokenRecord:
    t_s: float  # arrival, seconds after the workload started
    latency_s: float  # since the previous token of its request, or since sending it
    stream: int
    nodes: frozenset[str]  # node ids whose answers were used for this token
    branches: int  # branch steps over all layers
    lost: int  # of which masked or rejected
    lost_weight: float  # mean over layers of the weight renormalized away


@dataclass
class RequestRecord:
    stream: int
    prompt: int
    sent_s: float
    tokens: list[int] = field(default_factory=list)
    ok: bool = False
    error: str = ""


@dataclass
class ScoreRecord:
    sent_s: float
    done_s: float = float("nan")
    perplexity: float = float("nan")
    tokens: int = 0
    masked_branch_steps: int = 0
    logprobs: np.ndarray | None = None  # (tokens, vocab) float32
    error: str = ""


@dataclass
class RunRecord:
    tokens: list[TokenRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    score: ScoreRecord | None = None
    wall_s: float = 0.0
    last_seen: dict[str, float] = field(default_factory=dict)  # node id -> last use
    ramp: list[dict[str, Any]] = field(default_factory=list)  # an expansion's Status samples


def token_record(event: gw.GenerateEvent, t_s: float, latency_s: float, stream: int) -> TokenRecord:
    used = frozenset(
        b.node_id
        for layer in event.layers
        for b in layer.branches
        if b.outcome == gw.OUTCOME_OK and b.node_id
    )
    outcomes = [b.outcome for layer in event.layers for b in layer.branches]
    lost = sum(o != gw.OUTCOME_OK for o in outcomes)
    weight = [layer.lost_weight for layer in event.layers]
    return TokenRecord(
        t_s, latency_s, stream, used, len(outcomes), lost, sum(weight) / max(1, len(weight))
    )


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", 256 << 20)]  # Score's log-probabilities


async def run_workload(
    address: str,
    workload: Workload,
    t0: float,
    score_trigger: asyncio.Event,
    settled: Callable[[Mapping[str, float]], bool],
) -> RunRecord:
    """Run the streams and the scoring probe; ``t0`` is the workload's start (perf_counter).

    ``score_trigger`` is set by the fault driver once the first timed fault is in force;
    ``settled(last_seen)`` says whether every scheduled recovery has shown in the tokens.
    """
    record = RunRecord()
    end = t0 + workload.duration_s

    def stop() -> bool:
        now = time.perf_counter()
        return now >= end and (settled(record.last_seen) or now >= end + workload.recovery_grace_s)

    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        scorer = asyncio.create_task(_score_probe(stub, workload, t0, score_trigger, record))
        await asyncio.gather(
            *(_stream(stub, s, workload, t0, record, stop) for s in range(workload.streams))
        )
        record.wall_s = time.perf_counter() - t0
        await scorer
    return record


async def _stream(
    stub: gw_grpc.GatewayServiceStub,
    stream: int,
    workload: Workload,
    t0: float,
    record: RunRecord,
    stop: Callable[[], bool],
) -> None:
    turn = 0
    while not stop():
        prompt = (stream + turn * workload.streams) % len(workload.prompts)
        turn += 1
        prev = time.perf_counter()
        req = RequestRecord(stream, prompt, prev - t0)
        record.requests.append(req)
        call = stub.Generate(
            gw.GenerateRequest(
                prompt=workload.prompts[prompt],
                max_new_tokens=workload.max_new_tokens,
                temperature=0.0,
            ),
            timeout=workload.request_timeout_s,
        )
        try:
            async for event in call:
                now = time.perf_counter()
                tok = token_record(event, now - t0, now - prev, stream)
                record.tokens.append(tok)
                for node_id in tok.nodes:
                    record.last_seen[node_id] = tok.t_s
                req.tokens.append(event.token_id)
                prev = now
            req.ok = True
        except grpc.aio.AioRpcError as exc:
            req.error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(_FAILURE_BACKOFF_S)


async def _score_probe(
    stub: gw_grpc.GatewayServiceStub,
    workload: Workload,
    t0: float,
    trigger: asyncio.Event,
    record: RunRecord,
) -> None:
    with contextlib.suppress(TimeoutError):  # no timed fault: score half-way through
        await asyncio.wait_for(trigger.wait(), timeout=workload.duration_s / 2)
    record.score = await score_text(stub, workload, time.perf_counter() - t0)
    record.score.done_s = time.perf_counter() - t0


async def score_text(
    stub: gw_grpc.GatewayServiceStub, workload: Workload, sent_s: float
) -> ScoreRecord:
    """Score the perplexity text through the gateway, with log-probabilities."""
    score = ScoreRecord(sent_s)
    try:
        resp = await stub.Score(
            gw.ScoreRequest(text=perplexity_text(workload.text_chars), return_logprobs=True),
            timeout=workload.request_timeout_s,
        )
    except grpc.aio.AioRpcError as exc:
        score.error = f"{exc.code().name}: {exc.details()}"
        return score
    score.perplexity = resp.perplexity
    score.tokens = resp.tokens
    score.masked_branch_steps = resp.masked_branch_steps
    score.logprobs = decode(resp.logprobs).numpy().copy()
    return score
