"""One layer step across the swarm: fan out to every branch, collect, mask, renormalize, fuse.

For each branch the fastest usable replica gets the call (and, with hedging, the second one
when the first is slow). ``collect`` applies the fan-out policy; what answered is fused with
``mbt_core.aggregate`` over the trunk's alpha, exactly as the in-process model fuses, so a
healthy distributed step equals the in-process one. Late calls are never cancelled (that could
leave a hole in a node's cache); a node that missed positions says so and is replayed the
session's stored layer inputs before it is used again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mbt_aggregator.client import CacheGap, NodeCallError, StepSpec
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import Collected, FanoutPolicy, collect
from mbt_aggregator.registry import Node, Registry
from mbt_core.aggregate import aggregate
from mbt_core.config import AggregationConfig
from mbt_core.errors import NoBranchAvailable, QuorumNotReached
from mbt_core.model import MBTLanguageModel

log = logging.getLogger("mbt_aggregator")

OK, MASKED, REJECTED = "ok", "masked", "rejected"


@dataclass(frozen=True)
class BranchReport:
    branch: int
    outcome: str  # OK, MASKED or REJECTED
    node_id: str
    hedged: bool
    latency_s: float


@dataclass(frozen=True)
class LayerReport:
    layer: int
    branches: tuple[BranchReport, ...]
    latency_s: float
    lost_weight: float


@dataclass
class Session:
    """A generation as the nodes see it: an id, every layer's inputs so far, who took part."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: dict[int, Tensor] = field(default_factory=dict)  # layer -> (positions, C)
    nodes: set[str] = field(default_factory=set)


@dataclass
class _Answer:
    output: Tensor  # (T, C)
    node: Node
    seconds: float


class Engine:
    def __init__(
        self,
        trunk: MBTLanguageModel,
        registry: Registry,
        policy: FanoutPolicy,
        aggregation: AggregationConfig,
        metrics: Metrics,
    ) -> None:
        self.trunk = trunk
        self.registry = registry
        self.policy = policy
        self.aggregation = aggregation
        self.metrics = metrics
        with torch.no_grad():
            self.alphas = [layer.weights().detach() for layer in trunk.layers]

    async def run_layer(
        self, session: Session, layer: int, start: int, h: Tensor
    ) -> tuple[Tensor, LayerReport]:
        """Fuse layer ``layer``'s branches on ``h`` (T, C) at positions ``start..start+T``."""
        t0 = time.perf_counter()
        past = session.history.get(layer)
        kept = past[:start] if past is not None else h[:0]
        session.history[layer] = torch.cat([kept, h])
        alpha = self.alphas[layer]
        k = alpha.numel()
        primary, hedges, hedge_after = {}, {}, {}
        for b in range(k):
            replicas = self.registry.replicas((layer, b))
            if not replicas:
                continue
            # The primary fails over to the other replicas in turn when a call fails outright.
            primary[b] = self._caller(replicas, session, layer, b, start, h)
            if self.policy.hedge and len(replicas) > 1:
                hedges[b] = self._caller(replicas[1:2], session, layer, b, start, h)
                hedge_after[b] = replicas[0].p95(default_s=self.policy.request_timeout_s / 4)
        weights = {b: float(alpha[b]) for b in range(k)}
        got: Collected[int, _Answer] = await collect(
            primary, self.policy, weights=weights, hedges=hedges, hedge_after_s=hedge_after
        )
        for task in got.late_calls():
            task.add_done_callback(self._late_done)
        outputs = torch.zeros(k, *h.shape, dtype=h.dtype)
        present = torch.zeros(k, dtype=torch.bool)
        for b, answer in got.results.items():
            outputs[b] = answer.output
            present[b] = True
        try:
            fused = aggregate(
                outputs,
                alpha,
                present,
                self.aggregation.mode,
                norm_factor=self.aggregation.norm_factor,
                trim_fraction=self.aggregation.trim_fraction,
            )
        except NoBranchAvailable as exc:
            self.metrics.quorum_failures.labels(layer=str(layer)).inc()
            raise QuorumNotReached(f"layer {layer}: {exc}") from exc
        accepted = fused.accepted.all(dim=tuple(range(1, fused.accepted.dim())))  # (K,)
        rejected = fused.rejected.any(dim=tuple(range(1, fused.rejected.dim())))
        if int(accepted.sum()) < self.policy.min_branches:
            self.metrics.quorum_failures.labels(layer=str(layer)).inc()
            raise QuorumNotReached(
                f"layer {layer}: {int(accepted.sum())} branches usable, the policy needs "
                f"{self.policy.min_branches} (missing: {sorted(got.missing())})"
            )
        reports = []
        for b in range(k):
            answer = got.results.get(b)
            outcome = OK if bool(accepted[b]) else REJECTED if bool(rejected[b]) else MASKED
            reports.append(
                BranchReport(
                    branch=b,
                    outcome=outcome,
                    node_id=answer.node.node_id if answer else "",
                    hedged=b in got.hedged,
                    latency_s=answer.seconds if answer else got.elapsed_s,
                )
            )
            if outcome != OK:
                self.metrics.masked.labels(layer=str(layer), branch=str(b), reason=outcome).inc()
            if answer is not None and outcome == REJECTED:
                self._count(answer.node, layer, b, "rejected")
            if b in got.hedged:
                self.metrics.hedges.labels(layer=str(layer), branch=str(b)).inc()
        lost = float(1.0 - alpha[accepted].sum())
        elapsed = time.perf_counter() - t0
        self.metrics.layer_step(layer, elapsed, lost)
        return fused.output, LayerReport(layer, tuple(reports), elapsed, lost)

    def _caller(
        self,
        replicas: list[Node],
        session: Session,
        layer: int,
        branch: int,
        start: int,
        h: Tensor,
    ) -> Callable[[], Awaitable[_Answer]]:
        async def call() -> _Answer:
            for i, node in enumerate(replicas):
                try:
                    return await self._call(node, session, layer, branch, start, h)
                except NodeCallError as exc:
                    # A refused or unreachable replica: try the next. A timeout is not retried:
                    # the policy's time is spent.
                    if i + 1 == len(replicas) or exc.code.name == "DEADLINE_EXCEEDED":
                        raise
            raise RuntimeError("no replica to call")  # unreachable: replicas is never empty

        return call

    async def _call(
        self, node: Node, session: Session, layer: int, branch: int, start: int, h: Tensor
    ) -> _Answer:
        t = h.shape[0]
        labels = {"layer": str(layer), "branch": str(branch), "node": node.node_id[:16]}
        t0 = time.perf_counter()
        timeout = self.policy.request_timeout_s
        try:
            try:
                outs, _ = await node.client.forward(
                    layer, [branch], [StepSpec(session.session_id, start, t)], h, timeout
                )
                out = outs[branch]
            except CacheGap as gap:
                if gap.length >= start:
                    raise
                # The node missed positions gap.length..start: replay them with this step.
                replay = session.history[layer][gap.length : start + t]
                self.metrics.replays.labels(node=labels["node"]).inc()
                outs, _ = await node.client.forward(
                    layer,
                    [branch],
                    [StepSpec(session.session_id, gap.length, replay.shape[0])],
                    replay,
                    timeout,
                )
                out = outs[branch][-t:]
        except NodeCallError as exc:
            self.registry.failed(node)
            outcome = "timeout" if exc.code.name == "DEADLINE_EXCEEDED" else "error"
            self.metrics.branch_calls.labels(**labels, outcome=outcome).inc()
            raise
        seconds = time.perf_counter() - t0
        node.record_success(seconds)
        session.nodes.add(node.node_id)
        self.metrics.branch_calls.labels(**labels, outcome="ok").inc()
        self.metrics.branch_latency.labels(**labels).observe(seconds)
        return _Answer(out, node, seconds)

    def _count(self, node: Node, layer: int, branch: int, outcome: str) -> None:
        self.metrics.branch_calls.labels(
            layer=str(layer), branch=str(branch), node=node.node_id[:16], outcome=outcome
        ).inc()

    @staticmethod
    def _late_done(task: asyncio.Task[_Answer]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a late failure was already counted in _call

    async def end_session(self, session: Session) -> None:
        """Release the session's caches on every node that took part (best effort)."""
        calls = []
        for node_id in session.nodes:
            node = self.registry.get(node_id)
            if node is not None:
                calls.append(node.client.end_session(session.session_id, timeout_s=2.0))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.info("could not end session %s: %s", session.session_id, result)
