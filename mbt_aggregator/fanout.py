"""One layer step of a batch across the swarm: replica planning, node calls with failover,
hedges and replay, the payload; then the defense's screening, the fusion and the reports.

For each branch the fastest usable replica gets the call (and, with hedging, the second one
when the first is slow; with a replica check, two or three replicas at once). The calls handed
to :func:`mbt_aggregator.policy.collect` are plain coroutine functions that need nothing from
the engine: the policy decides when enough branches answered. Late calls are never cancelled
(that could leave a hole in a node's cache); a node that missed positions says so and is
replayed the session's stored layer inputs before it is used again.

What passed the :class:`~mbt_aggregator.defense.Defense` is fused with
``mbt_core.model.aggregate`` over the trunk's alpha, exactly as the in-process model fuses, so
a healthy distributed step equals the in-process one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from mbt_aggregator.client import Payload
from mbt_aggregator.defense import Defense
from mbt_aggregator.fit import fits, plan_calls
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.mix import FusionWeights, Mix
from mbt_aggregator.policy import Collected, FanoutPolicy, collect
from mbt_aggregator.registry import Node, Registry
from mbt_aggregator.reports import Answer, Reports, StepResult
from mbt_aggregator.session import Session
from mbt_core.errors import (
    NODE_TROUBLE,
    CacheGap,
    NoBranchAvailable,
    NodeCallError,
    NodeTimeout,
    QuorumNotReached,
    SessionGone,
)
from mbt_core.model.aggregate import aggregate
from mbt_core.model.config import AggregationConfig
from mbt_core.wire.contract import SessionStep

Call = Callable[[], Awaitable[Answer]]


class Part(NamedTuple):
    """What one Forward sends of one session: positions ``start..`` with inputs ``h``."""

    session: Session
    start: int
    h: Tensor  # (T, C)


def payload_of(layer: int, parts: list[Part], dtype: torch.dtype) -> Payload:
    """The Forward payload of ``parts``, their inputs in ``dtype`` (the wire's)."""
    h = parts[0].h if len(parts) == 1 else torch.cat([p.h for p in parts])
    steps = [
        SessionStep(p.session.session_id, p.start, p.h.shape[0], p.session.secret) for p in parts
    ]
    return Payload.of(layer, steps, h.to(dtype))


def _succeeded(task: asyncio.Task[Answer]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _late_done(task: asyncio.Task[Answer]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a late failure was already counted in NodeCalls.call


class NodeCalls:
    """Forwards to single nodes: a node that missed positions is replayed, a batch beyond what
    a node takes in one call is cut to its limits, and every call's outcome is counted."""

    def __init__(self, registry: Registry, reports: Reports, timeout_s: float) -> None:
        self.registry, self.reports = registry, reports
        self._timeout_s = timeout_s

    async def call(
        self,
        node: Node,
        parts: list[Part],
        layer: int,
        branches: tuple[int, ...],
        shared: Callable[[torch.dtype], Payload] | None = None,
    ) -> dict[int, Answer]:
        """One Forward to ``node`` for all of ``branches``, counted per branch."""
        for part in parts:  # asked is enough: a node may run a call its caller gave up on
            part.session.nodes.add(node.node_id)
        t0 = time.perf_counter()
        try:
            outputs = await self._forward(node, parts, layer, branches, shared)
        except NodeCallError as exc:
            self._count(node, layer, branches, exc)
            raise
        seconds = time.perf_counter() - t0
        self._count(node, layer, branches, None, seconds)
        return {b: Answer(outputs[b], node, seconds) for b in branches}

    def _count(
        self,
        node: Node,
        layer: int,
        branches: tuple[int, ...],
        error: NodeCallError | None,
        seconds: float = 0.0,
    ) -> None:
        """A node call's outcome, in one place: the node's record (a failure that says
        something about the node benches it; a refusal of the request does not) and the
        per-branch call metrics."""
        if error is None:
            node.record_success(seconds)
            self.reports.call(layer, branches, node.node_id, "ok", seconds)
            return
        if isinstance(error, NODE_TROUBLE):
            self.registry.failed(node)
        outcome = "timeout" if isinstance(error, NodeTimeout) else "error"
        self.reports.call(layer, branches, node.node_id, outcome)

    async def _forward(
        self,
        node: Node,
        parts: list[Part],
        layer: int,
        branches: tuple[int, ...],
        shared: Callable[[torch.dtype], Payload] | None = None,
    ) -> dict[int, Tensor]:
        """The outputs of ``parts`` from ``node``, packed as they are (``shared``: the
        fan-out's payload, when it fits the node); a node that missed positions is replayed."""
        try:
            return await self._send(node, layer, branches, parts, shared)
        except CacheGap as gap:
            if len(parts) > 1:  # which session has the hole: each on its own, each replayed
                outs = await asyncio.gather(
                    *(self._forward(node, [p], layer, branches) for p in parts)
                )
                return {b: torch.cat([o[b] for o in outs]) for b in branches}
            refusal = gap
        (part,) = parts
        rows = part.h.shape[0]
        # The node missed positions start..part.start: replay them with this part. Its
        # branches may hold different lengths; each refusal names a shorter one.
        for _ in range(len(branches)):
            start = refusal.length
            if start >= part.start:
                raise refusal
            replay = part.session.history[layer][start : part.start + rows]
            self.reports.replay(node.node_id)
            try:
                replayed = await self._send(
                    node, layer, branches, [Part(part.session, start, replay)]
                )
            except CacheGap as again:
                if again.length >= start:
                    raise
                refusal = again
                continue
            return {b: replayed[b][-rows:] for b in branches}
        raise refusal

    async def _send(
        self,
        node: Node,
        layer: int,
        branches: tuple[int, ...],
        parts: list[Part],
        shared: Callable[[torch.dtype], Payload] | None = None,
    ) -> dict[int, Tensor]:
        """``parts`` in one Forward, or, beyond what the node takes in one (its limits from
        ``Describe``), in several: steps split across calls, long ones in chunks, in order."""
        if any(p.session.ended for p in parts):
            # A late call (a primary failing over, a replay) after its generation ended: sent,
            # it would open the session again on a node that the end has passed already.
            raise SessionGone(node.address, "the generation ended; not sent")
        timeout, dtype = self._timeout_s, node.wire_dtype
        lengths = [p.h.shape[0] for p in parts]
        positions = node.limits.positions(parts[0].h.shape[1], dtype.itemsize, len(branches))
        if fits(lengths, node.limits.max_steps, positions):
            payload = shared(dtype) if shared is not None else payload_of(layer, parts, dtype)
            outs, _ = await node.client.send(payload, branches, timeout)
            self.reports.sent(len(payload.data), outs, dtype)
            return outs
        pieces: dict[int, list[Tensor]] = {b: [] for b in branches}
        for call in plan_calls(lengths, node.limits.max_steps, positions):
            chunk = [
                Part(
                    parts[c.step].session,
                    parts[c.step].start + c.offset,
                    parts[c.step].h[c.offset : c.offset + c.length],
                )
                for c in call
            ]
            payload = payload_of(layer, chunk, dtype)
            outs, _ = await node.client.send(payload, branches, timeout)
            self.reports.sent(len(payload.data), outs, dtype)
            for b in branches:
                pieces[b].append(outs[b])
        return {b: torch.cat(pieces[b]) for b in branches}


class LayerCalls:
    """The Forwards of one layer step, shared: the branches planned on the same node (its first
    choice, or a median vote's replicas) travel in one call to it; a hedge, a failover or an
    audit asks another node for one branch (whose cache is likely behind: its replay stays
    apart from the other branches)."""

    def __init__(
        self, node_calls: NodeCalls, parts: list[Part], layer: int, plan: dict[int, list[Node]]
    ) -> None:
        # Taken now: a call that outlives the layer step (a hedge's loser, an audit) replays
        # from these, while the steps themselves have moved on to the next layer's inputs.
        self._node_calls, self._layer, self._parts = node_calls, layer, parts
        self._payloads: dict[torch.dtype, Payload] = {}  # built once for every node asked
        self._planned: dict[str, tuple[int, ...]] = {}
        for b, nodes in plan.items():
            for node in nodes:
                self._planned[node.node_id] = (*self._planned.get(node.node_id, ()), b)
        self._running: dict[tuple[str, tuple[int, ...]], asyncio.Future[dict[int, Answer]]] = {}

    async def answer(self, node: Node, branch: int) -> Answer:
        planned = self._planned.get(node.node_id, ())
        branches = planned if branch in planned else (branch,)
        key = (node.node_id, branches)
        shared = self._running.get(key)
        if shared is not None:
            # Shielded: a waiter that goes away must not cancel the call the others share.
            return (await asyncio.shield(shared))[branch]
        # The first asker makes the call itself (no task of its own: fan-out calls are never
        # cancelled); later askers of the same node and branches wait for its outcome.
        outcome: asyncio.Future[dict[int, Answer]] = asyncio.get_running_loop().create_future()
        self._running[key] = outcome
        try:
            answers = await self._node_calls.call(
                node, self._parts, self._layer, branches, self.payload
            )
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except Exception as exc:
            outcome.set_exception(exc)
            outcome.exception()  # retrieved: nobody else may be waiting
            raise
        outcome.set_result(answers)
        return answers[branch]

    def payload(self, dtype: torch.dtype) -> Payload:
        """The whole batch's payload in ``dtype``, serialized once for all nodes that take it."""
        payload = self._payloads.get(dtype)
        if payload is None:
            payload = self._payloads[dtype] = payload_of(self._layer, self._parts, dtype)
        return payload


class Fanout:
    """Layer steps of batches across the swarm: ask the nodes, screen, fuse, report."""

    def __init__(
        self,
        registry: Registry,
        policy: FanoutPolicy,
        aggregation: AggregationConfig,
        defense: Defense,
        metrics: Metrics,
        weights: FusionWeights,
    ) -> None:
        self.registry, self.policy, self.defense, self.metrics = registry, policy, defense, metrics
        self._aggregation = aggregation
        self.weights = weights
        self._reports = Reports(metrics, policy.min_branches, weights.current.weights)
        self.node_calls = NodeCalls(registry, self._reports, policy.request_timeout_s)

    def reweighed(self) -> None:
        """The current mix changed (an expansion's ramp): new branches' series start at 0,
        and the width diagnostics use the new weights."""
        for layer, weights in enumerate(self.weights.current.weights):
            self._reports.declare(layer, weights)

    async def step(self, layer: int, parts: list[Part]) -> list[StepResult]:
        """One layer step of ``parts``: each one's output rows and report, or its failure.

        Steps fuse with their session's mix (the current one, unless pinned): steps of
        different mixes go out as separate fan-outs, side by side."""
        current = self.weights.current
        mixes = [p.session.mix or current for p in parts]
        first = mixes[0]
        if all(m is first for m in mixes):
            return await self._step(layer, parts, first)
        groups: dict[Mix, list[int]] = {}
        for i, mix in enumerate(mixes):
            groups.setdefault(mix, []).append(i)
        outcomes = await asyncio.gather(
            *(self._step(layer, [parts[i] for i in idx], m) for m, idx in groups.items()),
            return_exceptions=True,
        )
        results: list[StepResult] = [RuntimeError("not stepped")] * len(parts)
        for idx, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            for n, i in enumerate(idx):
                results[i] = outcome if isinstance(outcome, BaseException) else outcome[n]
        return results

    async def _step(self, layer: int, parts: list[Part], mix: Mix) -> list[StepResult]:
        t0 = time.perf_counter()
        alpha = mix.alphas[layer]
        k = alpha.numel()
        got = await self.collect(layer, parts, mix)
        rows = [p.h.shape[0] for p in parts]
        outputs, present, refused = self.defense.screen_layer(
            layer, k, got.results, sum(rows), parts[0].h
        )
        cfg = self._aggregation
        try:
            fused = aggregate(
                outputs,
                alpha,
                present,
                cfg.mode,
                norm_factor=self.defense.norm_factor(layer, k, cfg.norm_factor),
                trim_fraction=cfg.trim_fraction,
            )
        except NoBranchAvailable as exc:
            self._reports.quorum_failed(layer)
            raise QuorumNotReached(f"layer {layer}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        return self._reports.results(layer, got, fused, refused, rows, elapsed, mix.weights[layer])

    async def collect(
        self, layer: int, parts: list[Part], mix: Mix | None = None
    ) -> Collected[int, Answer]:
        """Every branch's answer as the policy collects them; late calls run on, and a late
        primary whose hedge was used audits it when it answers."""
        weights = (mix or self.weights.current).weights[layer]
        replicas = self.registry.layer_replicas(layer, len(weights))
        asked = {
            b: self.defense.replicas_to_ask(len(nodes), (layer, b)) for b, nodes in replicas.items()
        }
        # A vote's replicas share the step's calls; an audited second replica gets its own.
        plan = {b: nodes[: asked[b] if asked[b] > 2 else 1] for b, nodes in replicas.items()}
        calls = LayerCalls(self.node_calls, parts, layer, plan)
        primary: dict[int, Call] = {}
        hedges: dict[int, Call] = {}
        hedge_after: dict[int, float] = {}
        for b, nodes in replicas.items():
            if asked[b] > 1:  # an audit (2) or a vote (3): no hedge, replicas are asked already
                primary[b] = self._voter(nodes, asked[b], calls, b)
                if asked[b] == 2:
                    self._reports.audit(layer, b)
                continue
            # The primary fails over to the other replicas in turn when a call fails outright.
            primary[b] = self._caller(nodes, calls, b)
            if self.policy.hedge and len(nodes) > 1:
                hedges[b] = self._caller(nodes[1:2], calls, b)
                hedge_after[b] = nodes[0].p95(default_s=self.policy.request_timeout_s / 4)
        got: Collected[int, Answer] = await collect(
            primary,
            self.policy,
            weights=weights,
            hedges=hedges,
            hedge_after_s=hedge_after,
        )
        for task in got.late_calls():
            task.add_done_callback(_late_done)
        for b in got.answered_by_hedge:  # the late primary, when it answers, audits the hedge
            for task in got.late.get(b, ()):
                task.add_done_callback(
                    functools.partial(self._cross_check, layer, len(weights), b, got.results[b])
                )
        return got

    def _cross_check(
        self, layer: int, k: int, branch: int, used: Answer, primary: asyncio.Task[Answer]
    ) -> None:
        """A hedged step's primary answered after the hedge that was used: compare the two,
        as an audit would (a free one)."""
        if not _succeeded(primary) or not self.defense.checks_replicas:
            return
        late = primary.result()
        if late.node is used.node or late.outputs.shape != used.outputs.shape:
            return
        self._reports.audit(layer, branch)
        pair = {branch: replace(used, others=(late,))}  # screened as an audit's pair: counted
        rows = used.outputs.shape[0]
        self.defense.screen_layer(layer, k, pair, rows, used.outputs)

    def _voter(self, replicas: list[Node], asked: int, calls: LayerCalls, branch: int) -> Call:
        """Ask the first ``asked`` replicas at once (an audit, or a median vote). The answers
        in by ``replica_wait_ms`` after the first travel together, to be screened; should
        all of them fail, the remaining replicas are tried in turn."""
        wait_s = self.defense.config.replica_wait_ms / 1000
        fallback = self._caller(replicas[asked:], calls, branch) if len(replicas) > asked else None

        async def call() -> Answer:
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(calls.answer(n, branch)) for n in replicas[:asked]]
            pending: set[asyncio.Task[Answer]] = set(tasks)
            while pending and not any(_succeeded(t) for t in tasks):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                _, pending = await asyncio.wait(pending, timeout=wait_s)
            for task in pending:  # never cancelled: the call may fill a node's cache
                task.add_done_callback(_late_done)
            answers = [t.result() for t in tasks if _succeeded(t)]
            if answers:
                return replace(answers[0], others=tuple(answers[1:]))
            if fallback is not None:
                return await fallback()
            raise next(e for t in tasks if (e := t.exception()) is not None)

        return call

    def _caller(self, replicas: list[Node], calls: LayerCalls, branch: int) -> Call:
        async def call() -> Answer:
            for i, node in enumerate(replicas):
                try:
                    return await calls.answer(node, branch)
                except NodeCallError as exc:
                    # A refused or unreachable replica: try the next. A timeout is not retried:
                    # the policy's time is spent.
                    if i + 1 == len(replicas) or isinstance(exc, NodeTimeout):
                        raise
            raise RuntimeError("no replica to call")  # unreachable: replicas is never empty

        return call
