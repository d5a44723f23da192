"""``mbt.v1.GatewayService``: generation (streamed, with per-layer branch info), scoring, status."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator

import grpc

from mbt_aggregator.config import GatewayLimits
from mbt_aggregator.engine import MASKED, OK, REJECTED, Engine, LayerReport
from mbt_aggregator.generation import generate_tokens, read_ahead, score
from mbt_core.artifacts.manifest import Manifest
from mbt_core.errors import QuorumNotReached
from mbt_core.model.sampling import SamplingConfig
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.wire.codec import encode
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

MAX_LOGPROB_BYTES = 256 << 20  # Score with return_logprobs sends (tokens, vocab) float32
EVENTS_AHEAD = 4  # tokens a generation may run ahead of its client's stream
_OUTCOMES = {OK: gw.OUTCOME_OK, MASKED: gw.OUTCOME_MASKED, REJECTED: gw.OUTCOME_REJECTED}


@functools.lru_cache(maxsize=1024)
def layer_info(report: LayerReport) -> gw.LayerInfo:
    """The wire form of a report; the generations of one batch share theirs, so it is cached."""
    return gw.LayerInfo(
        layer=report.layer,
        latency_ms=report.latency_s * 1e3,
        lost_weight=report.lost_weight,
        branches=[
            gw.BranchInfo(
                branch=b.branch,
                outcome=_OUTCOMES[b.outcome],
                node_id=b.node_id,
                hedged=b.hedged,
                latency_ms=b.latency_s * 1e3,
            )
            for b in report.branches
        ],
    )


class GatewayServicer(gw_grpc.GatewayServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        manifest: Manifest,
        manifest_sha256: str,
        limits: GatewayLimits,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.limits = limits

    def _sampling(self, request: gw.GenerateRequest) -> SamplingConfig:
        if request.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(
                f"max_new_tokens {request.max_new_tokens} exceeds the limit of "
                f"{self.limits.max_new_tokens}"
            )
        return SamplingConfig(
            max_new_tokens=request.max_new_tokens or 100,
            temperature=request.temperature,
            top_k=request.top_k or None,
            top_p=request.top_p if 0.0 < request.top_p < 1.0 else None,
            seed=request.seed,
        )

    async def Generate(
        self, request: gw.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.GenerateEvent]:
        metrics = self.engine.metrics
        try:
            cfg = self._sampling(request)
            prompt = self.tokenizer.encode(request.prompt)
            if not prompt:
                raise ValueError("the prompt is empty")
            if len(prompt) > self.limits.max_prompt_tokens:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens exceeds the limit of "
                    f"{self.limits.max_prompt_tokens}"
                )
        except ValueError as exc:
            metrics.requests_failed.labels(reason="invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        t0 = time.perf_counter()

        async def events() -> AsyncIterator[gw.GenerateEvent]:
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
                    full = self.tokenizer.decode(produced)  # BPE pieces may split characters
                    text, shown = full[len(shown) :], full
                yield gw.GenerateEvent(
                    index=event.index,
                    token_id=event.token,
                    text=text,
                    layers=[layer_info(r) for r in event.layers],
                    latency_ms=event.seconds * 1e3,
                )

        try:
            # The next token is computed while this one is on its way to the client.
            async for reply in read_ahead(events(), EVENTS_AHEAD):
                yield reply
        except QuorumNotReached as exc:
            metrics.requests_failed.labels(reason="quorum").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Score(
        self, request: gw.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> gw.ScoreResponse:
        ids = self.tokenizer.encode(request.text)
        if len(ids) < 2 or len(ids) > self.limits.max_score_tokens:
            self.engine.metrics.requests_failed.labels(reason="invalid").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text must encode to 2..{self.limits.max_score_tokens} tokens, got {len(ids)}",
            )
        vocab = self.engine.trunk.cfg.vocab_size
        if request.return_logprobs and (len(ids) - 1) * vocab * 4 > MAX_LOGPROB_BYTES:
            self.engine.metrics.requests_failed.labels(reason="invalid").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"log-probabilities of {len(ids) - 1} positions x {vocab} tokens exceed "
                f"{MAX_LOGPROB_BYTES >> 20} MiB: score a shorter text",
            )
        try:
            result = await score(self.engine, ids, request.return_logprobs)
        except QuorumNotReached as exc:
            self.engine.metrics.requests_failed.labels(reason="quorum").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return gw.ScoreResponse(
            log_likelihood=result.log_likelihood,
            tokens=result.tokens,
            perplexity=result.perplexity,
            masked_branch_steps=result.masked_branch_steps,
            logprobs=encode(result.logprobs) if result.logprobs is not None else None,
        )

    async def Status(
        self, request: gw.StatusRequest, context: grpc.aio.ServicerContext
    ) -> gw.StatusResponse:
        registry = self.engine.registry
        nodes = [
            gw.NodeStatus(
                node_id=n.node_id,
                address=n.address,
                branches=[f"{lay}:{b}" for lay, b in sorted(n.branches)],
                healthy=n.failures == 0 and not registry.quarantined(n.node_id),
                latency_ms=n.latency_estimate() * 1e3,
            )
            for n in registry.nodes
        ]
        branches = [
            gw.BranchStatus(
                layer=lay,
                branch=b,
                live_replicas=registry.live_replicas((lay, b)),
                weight=float(alpha[b]),
            )
            for lay, alpha in enumerate(self.engine.alphas)
            for b in range(alpha.numel())
        ]
        return gw.StatusResponse(
            model_id=self.manifest.model_id,
            model_version=self.manifest.model_version,
            manifest_sha256=self.manifest_sha256,
            policy=repr(self.engine.policy),
            nodes=nodes,
            branches=branches,
        )
