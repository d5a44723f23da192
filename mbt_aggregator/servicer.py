"""``mbt.v1.GatewayService``: generation (streamed, with per-layer branch info), scoring, status.

gRPC in and out only: requests are served by :class:`~mbt_aggregator.generation.Gateway`, the
status is :meth:`Engine.status`, and :data:`STATUS_OF` is the one table that turns the errors a
request may end with into gRPC status codes.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable

import grpc

from mbt_aggregator.engine import BranchState, Engine
from mbt_aggregator.expansion import ExpansionState
from mbt_aggregator.generation import Gateway, GenerateRequest, read_ahead
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.reports import MASKED, OK, REJECTED, LayerReport
from mbt_core.artifacts.manifest import Manifest, manifest_digest
from mbt_core.errors import InvalidRequest, MbtError, QuorumNotReached
from mbt_core.wire.codec import encode
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

EVENTS_AHEAD = 4  # tokens a generation may run ahead of its client's stream
_OUTCOMES = {OK: gw.OUTCOME_OK, MASKED: gw.OUTCOME_MASKED, REJECTED: gw.OUTCOME_REJECTED}
STATUS_OF: dict[type[MbtError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QuorumNotReached: grpc.StatusCode.UNAVAILABLE,
}
_TOLD = tuple(STATUS_OF)  # what a client is told as such; anything else is UNKNOWN


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


def generate_request(request: gw.GenerateRequest) -> GenerateRequest:
    """The request's settings, with proto3's zeros read as "not set"."""
    return GenerateRequest(
        prompt=request.prompt,
        max_new_tokens=request.max_new_tokens or None,
        temperature=request.temperature,
        top_k=request.top_k or None,
        top_p=request.top_p if 0.0 < request.top_p < 1.0 else None,
        seed=request.seed,
    )


async def _abort(context: grpc.aio.ServicerContext, exc: MbtError) -> None:
    code = next(STATUS_OF[c] for c in type(exc).__mro__ if c in STATUS_OF)
    await context.abort(code, str(exc))


class GatewayServicer(gw_grpc.GatewayServiceServicer):
    def __init__(
        self,
        gateway: Gateway,
        engine: Engine,
        manifest: Manifest,
        manifest_sha256: str,
        policy: FanoutPolicy,
    ) -> None:
        self.gateway = gateway
        self.engine = engine
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.policy = policy
        self.expansion: Callable[[], ExpansionState] = ExpansionState

    def serve(self, manifest: Manifest) -> None:
        """The model the gateway serves now (a live expansion, or its rollback)."""
        self.manifest, self.manifest_sha256 = manifest, manifest_digest(manifest)

    async def Generate(
        self, request: gw.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gw.GenerateEvent]:
        try:
            # The next token is computed while this one is on its way to the client.
            events = read_ahead(self.gateway.generate(generate_request(request)), EVENTS_AHEAD)
            async for event in events:
                yield gw.GenerateEvent(
                    index=event.index,
                    token_id=event.token,
                    text=event.text,
                    layers=[layer_info(r) for r in event.layers],
                    latency_ms=event.seconds * 1e3,
                )
        except _TOLD as exc:
            await _abort(context, exc)

    async def Score(
        self, request: gw.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> gw.ScoreResponse:
        try:
            result = await self.gateway.score(request.text, request.return_logprobs)
        except _TOLD as exc:
            await _abort(context, exc)
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
        return self.status()

    def status(self) -> gw.StatusResponse:
        """The swarm now (also the web view's, :mod:`mbt_aggregator.webview`)."""
        status = self.engine.status()
        return gw.StatusResponse(
            model_id=self.manifest.model_id,
            model_version=self.manifest.model_version,
            manifest_sha256=self.manifest_sha256,
            policy=self.policy.summary(),
            fanout_policy=fanout_policy(self.policy),
            nodes=[
                gw.NodeStatus(
                    node_id=n.node_id,
                    address=n.address,
                    branches=[f"{lay}:{b}" for lay, b in n.branches],
                    healthy=n.healthy,
                    latency_ms=n.latency_s * 1e3,
                )
                for n in status.nodes
            ],
            branches=[branch_status(s) for s in status.branches],
            expansion=expansion_status(self.expansion()),
        )


def expansion_status(e: ExpansionState) -> gw.ExpansionStatus:
    return gw.ExpansionStatus(
        state=e.state,
        from_version=e.from_version,
        to_version=e.to_version,
        beta=e.beta,
        target=e.target,
        drift_kl=e.drift_kl,
        probe_perplexity=e.probe_perplexity,
        base_perplexity=e.base_perplexity,
        reason=e.reason,
        new_branches=[f"{lay}:{b}" for lay, b in e.new_branches],
    )


def fanout_policy(p: FanoutPolicy) -> gw.FanoutPolicy:
    return gw.FanoutPolicy(
        mode=p.mode,
        request_timeout_s=p.request_timeout_s,
        quorum_branches=p.quorum_branches,
        quorum_weight=p.quorum_weight,
        grace_ms=p.grace_ms,
        deadline_ms=p.deadline_ms,
        min_branches=p.min_branches,
        hedge=p.hedge,
    )


def branch_status(s: BranchState) -> gw.BranchStatus:
    out = gw.BranchStatus(
        layer=s.layer, branch=s.branch, live_replicas=s.live_replicas, weight=s.weight
    )
    if s.recent is not None:
        out.last_outcome = _OUTCOMES[s.recent.last]
        out.recent_ok = s.recent.counts[OK]
        out.recent_masked = s.recent.counts[MASKED]
        out.recent_rejected = s.recent.counts[REJECTED]
    return out
