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
class _Step:
    """One session's step waiting at a layer (steps of concurrent sessions fan out together)."""

    session: Session
    start: int
    h: Tensor  # (T, C)
    future: asyncio.Future[tuple[Tensor, LayerReport]]


@dataclass
class _Answer:
    outputs: list[Tensor]  # per step of the batch, (T_i, C)
    node: Node
    seconds: float


class Engine:
    """Layer steps across the swarm. Steps of concurrent generations that reach the same layer
    are merged: one ``Forward`` per branch carries all of them (continuous batching)."""

    def __init__(
        self,
        trunk: MBTLanguageModel,
        registry: Registry,
        policy: FanoutPolicy,
        aggregation: AggregationConfig,
        metrics: Metrics,
        max_batch_steps: int = 64,
    ) -> None:
        self.trunk = trunk
        self.registry = registry
        self.policy = policy
        self.aggregation = aggregation
        self.metrics = metrics
        self.max_batch_steps = max_batch_steps
        with torch.no_grad():
            self.alphas = [layer.weights().detach() for layer in trunk.layers]
        self._queues: dict[int, list[_Step]] = {}
        self._wakeups: dict[int, asyncio.Event] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}

    async def run_layer(
        self, session: Session, layer: int, start: int, h: Tensor
    ) -> tuple[Tensor, LayerReport]:
        """Fuse layer ``layer``'s branches on ``h`` (T, C) at positions ``start..start+T``."""
        past = session.history.get(layer)
        kept = past[:start] if past is not None else h[:0]
        session.history[layer] = torch.cat([kept, h])
        future: asyncio.Future[tuple[Tensor, LayerReport]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queues.setdefault(layer, []).append(_Step(session, start, h, future))
        self._wake(layer)
        return await future

    def _wake(self, layer: int) -> None:
        loop = asyncio.get_running_loop()
        worker = self._workers.get(layer)
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._wakeups[layer] = asyncio.Event()
            self._workers[layer] = loop.create_task(self._work(layer), name=f"layer{layer}")
        self._wakeups[layer].set()

    async def close(self) -> None:
        for worker in self._workers.values():
            worker.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()

    async def _work(self, layer: int) -> None:
        queue, wakeup = self._queues.setdefault(layer, []), self._wakeups[layer]
        while True:
            if not queue:
                wakeup.clear()
                await wakeup.wait()
            batch = [s for s in queue[: self.max_batch_steps] if not s.future.done()]
            del queue[: self.max_batch_steps]
            if not batch:
                continue
            try:
                results = await self._fanout(layer, batch)
            except Exception as exc:  # every step of the batch fails alike
                results = [exc] * len(batch)
            for step, result in zip(batch, results, strict=True):
                if step.future.done():
                    continue  # its generation went away
                if isinstance(result, BaseException):
                    step.future.set_exception(result)
                else:
                    step.future.set_result(result)

    async def _fanout(
        self, layer: int, batch: list[_Step]
    ) -> list[tuple[Tensor, LayerReport] | BaseException]:
        t0 = time.perf_counter()
        alpha = self.alphas[layer]
        k = alpha.numel()
        primary, hedges, hedge_after = {}, {}, {}
        for b in range(k):
            replicas = self.registry.replicas((layer, b))
            if not replicas:
                continue
            # The primary fails over to the other replicas in turn when a call fails outright.
            primary[b] = self._caller(replicas, batch, layer, b)
            if self.policy.hedge and len(replicas) > 1:
                hedges[b] = self._caller(replicas[1:2], batch, layer, b)
                hedge_after[b] = replicas[0].p95(default_s=self.policy.request_timeout_s / 4)
        weights = {b: float(alpha[b]) for b in range(k)}
        got: Collected[int, _Answer] = await collect(
            primary, self.policy, weights=weights, hedges=hedges, hedge_after_s=hedge_after
        )
        for task in got.late_calls():
            task.add_done_callback(self._late_done)
        rows = [step.h.shape[0] for step in batch]
        h = torch.cat([step.h for step in batch])  # (N, C)
        outputs = torch.zeros(k, *h.shape, dtype=h.dtype)
        present = torch.zeros(k, dtype=torch.bool)
        for b, answer in got.results.items():
            outputs[b] = torch.cat(answer.outputs)
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
        elapsed = time.perf_counter() - t0
        results: list[tuple[Tensor, LayerReport] | BaseException] = []
        offset = 0
        for n in rows:
            part = slice(offset, offset + n)
            offset += n
            accepted = fused.accepted[:, part].all(1)  # (K,)
            rejected = fused.rejected[:, part].any(1)
            if int(accepted.sum()) < self.policy.min_branches:
                self.metrics.quorum_failures.labels(layer=str(layer)).inc()
                results.append(
                    QuorumNotReached(
                        f"layer {layer}: {int(accepted.sum())} branches usable, the policy needs "
                        f"{self.policy.min_branches} (missing: {sorted(got.missing())})"
                    )
                )
                continue
            reports = tuple(
                self._report(layer, b, got, bool(accepted[b]), bool(rejected[b])) for b in range(k)
            )
            lost = float(1.0 - alpha[accepted].sum())
            self.metrics.layer_step(layer, elapsed, lost)
            results.append((fused.output[part], LayerReport(layer, reports, elapsed, lost)))
        return results

    def _report(
        self, layer: int, b: int, got: Collected[int, _Answer], accepted: bool, rejected: bool
    ) -> BranchReport:
        answer = got.results.get(b)
        outcome = OK if accepted else REJECTED if rejected else MASKED
        if outcome != OK:
            self.metrics.masked.labels(layer=str(layer), branch=str(b), reason=outcome).inc()
        if answer is not None and outcome == REJECTED:
            self._count(answer.node, layer, b, "rejected")
        if b in got.hedged:
            self.metrics.hedges.labels(layer=str(layer), branch=str(b)).inc()
        return BranchReport(
            branch=b,
            outcome=outcome,
            node_id=answer.node.node_id if answer else "",
            hedged=b in got.hedged,
            latency_s=answer.seconds if answer else got.elapsed_s,
        )

    def _caller(
        self, replicas: list[Node], batch: list[_Step], layer: int, branch: int
    ) -> Callable[[], Awaitable[_Answer]]:
        async def call() -> _Answer:
            for i, node in enumerate(replicas):
                try:
                    return await self._call(node, batch, layer, branch)
                except NodeCallError as exc:
                    # A refused or unreachable replica: try the next. A timeout is not retried:
                    # the policy's time is spent.
                    if i + 1 == len(replicas) or exc.code.name == "DEADLINE_EXCEEDED":
                        raise
            raise RuntimeError("no replica to call")  # unreachable: replicas is never empty

        return call

    async def _call(self, node: Node, batch: list[_Step], layer: int, branch: int) -> _Answer:
        labels = {"layer": str(layer), "branch": str(branch), "node": node.node_id[:16]}
        t0 = time.perf_counter()
        try:
            outputs = await self._forward(node, batch, layer, branch)
        except NodeCallError as exc:
            self.registry.failed(node)
            outcome = "timeout" if exc.code.name == "DEADLINE_EXCEEDED" else "error"
            self.metrics.branch_calls.labels(**labels, outcome=outcome).inc()
            raise
        seconds = time.perf_counter() - t0
        node.record_success(seconds)
        for step in batch:
            step.session.nodes.add(node.node_id)
        self.metrics.branch_calls.labels(**labels, outcome="ok").inc()
        self.metrics.branch_latency.labels(**labels).observe(seconds)
        return _Answer(outputs, node, seconds)

    async def _forward(
        self, node: Node, batch: list[_Step], layer: int, branch: int
    ) -> list[Tensor]:
        """One Forward for the whole batch; a node that missed positions is replayed to."""
        timeout = self.policy.request_timeout_s
        rows = [step.h.shape[0] for step in batch]
        steps = [
            StepSpec(s.session.session_id, s.start, n) for s, n in zip(batch, rows, strict=True)
        ]
        try:
            outs, _ = await node.client.forward(
                layer, [branch], steps, torch.cat([s.h for s in batch]), timeout
            )
            return list(outs[branch].split(rows))
        except CacheGap as gap:
            if len(batch) > 1:  # which session has the hole: each on its own, each replayed
                parts = await asyncio.gather(
                    *(self._forward(node, [s], layer, branch) for s in batch)
                )
                return [p[0] for p in parts]
            (step,) = batch
            if gap.length >= step.start:
                raise
            # The node missed positions gap.length..start: replay them with this step.
            replay = step.session.history[layer][gap.length : step.start + rows[0]]
            self.metrics.replays.labels(node=node.node_id[:16]).inc()
            outs, _ = await node.client.forward(
                layer,
                [branch],
                [StepSpec(step.session.session_id, gap.length, replay.shape[0])],
                replay,
                timeout,
            )
            return [outs[branch][-rows[0] :]]

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
