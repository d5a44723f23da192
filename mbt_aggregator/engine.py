"""One layer step across the swarm: fan out to every branch, collect, mask, renormalize, fuse.

For each branch the fastest usable replica gets the call (and, with hedging, the second one
when the first is slow; with a replica check, two or three replicas at once). ``collect``
applies the fan-out policy; every answer is screened per branch (``mbt_aggregator.defense``:
bounds, replica votes); what passed is fused with ``mbt_core.aggregate`` over the trunk's
alpha, exactly as the in-process model fuses, so a healthy distributed step equals the
in-process one. Late calls are never cancelled (that could leave a hole in a node's cache); a
node that missed positions says so and is replayed the session's stored layer inputs before it
is used again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import grpc
import torch
from torch import Tensor

from mbt_aggregator.client import CacheGap, NodeCallError, Payload, StepSpec
from mbt_aggregator.defense import OFF, Defense, Screened, account
from mbt_aggregator.fit import fits, plan_calls
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import Collected, FanoutPolicy, collect
from mbt_aggregator.registry import Node, Registry
from mbt_aggregator.session import Ender, LayerInputs, Session, SessionSlots
from mbt_core.errors import NoBranchAvailable, QuorumNotReached
from mbt_core.model.aggregate import aggregate
from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel

log = logging.getLogger("mbt_aggregator")

OK, MASKED, REJECTED = "ok", "masked", "rejected"


class BranchReport(NamedTuple):  # records, built per branch per layer step: tuples
    branch: int
    outcome: str  # OK, MASKED or REJECTED
    node_id: str
    hedged: bool
    latency_s: float


class LayerReport(NamedTuple):
    layer: int
    branches: tuple[BranchReport, ...]
    latency_s: float
    lost_weight: float


# Failures that say something about the node (down, slow, overloaded, broken), so that it
# is benched for a while. A refusal of the request itself (a late hedge's session that has
# ended meanwhile, a cache gap) says nothing of the kind: benching a healthy replica for it
# leaves the branch one fault away from being masked.
NODE_TROUBLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass
class _Step:
    """One session's step on its way through the layers ``layer..last``: steps of concurrent
    sessions that wait at the same layer fan out together, and a layer's worker hands each
    step on to the next layer itself (no wake-up of the session's task between layers)."""

    session: Session
    start: int
    h: Tensor  # (T, C) the input of ``layer``
    layer: int
    last: int
    head: bool  # end with the trunk's head: the result is logits (T, V), not the hidden state
    future: asyncio.Future[tuple[Tensor, list[LayerReport]]]
    reports: list[LayerReport] = field(default_factory=list)


@dataclass
class _Answer:
    outputs: Tensor  # every step of the batch, packed (N, C)
    node: Node
    seconds: float
    others: tuple[_Answer, ...] = ()  # the other replicas asked with it (an audit or a vote)


@dataclass(frozen=True)
class BatchingConfig:
    """Continuous batching: how many steps one ``Forward`` carries, how long a layer gathers.

    A layer holds its batch while fewer steps are queued than sessions are live, until nothing
    new arrived for ``gather_idle_ms`` or ``gather_ms`` passed. Concurrent generations so fall
    into step: all of them cross each layer in one call per branch instead of four smaller
    ones, each call paying its fixed cost. A lone generation never waits.
    """

    max_batch_steps: int = 64
    gather_ms: float = 20.0
    gather_idle_ms: float = 2.0
    live_after_s: float = 2.0  # a session not seen for this long no longer counts as live

    def __post_init__(self) -> None:
        if self.max_batch_steps <= 0 or min(self.gather_ms, self.gather_idle_ms) < 0:
            raise ValueError("max_batch_steps must be positive and the gather times >= 0")


def _per_step(mask: Tensor, rows: list[int], reduce: Callable[..., bool]) -> list[tuple[bool, ...]]:
    """Per session step, per branch: ``reduce`` (all/any) of ``mask`` (K, positions) over the
    step's positions. Decode steps are one position each: one conversion serves them all."""
    if all(n == 1 for n in rows):
        return [tuple(r) for r in mask.T.tolist()]
    out, offset = [], 0
    for n in rows:
        out.append(tuple(reduce(col) for col in mask[:, offset : offset + n].tolist()))
        offset += n
    return out


class _Part(NamedTuple):
    """What one Forward sends of one session: positions ``start..`` with inputs ``h``."""

    session: Session
    start: int
    h: Tensor  # (T, C)


def _payload(layer: int, parts: list[_Part], dtype: torch.dtype) -> Payload:
    """The Forward payload of ``parts``, their inputs in ``dtype`` (the wire's)."""
    h = parts[0].h if len(parts) == 1 else torch.cat([p.h for p in parts])
    steps = [StepSpec(p.session.session_id, p.start, p.h.shape[0], p.session.secret) for p in parts]
    return Payload.of(layer, steps, h.to(dtype))


def _parts(batch: list[_Step]) -> list[_Part]:
    return [_Part(s.session, s.start, s.h) for s in batch]


def _succeeded(task: asyncio.Task[_Answer]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class _NodeCalls:
    """The Forwards of one layer step, shared: the branches planned on the same node (its first
    choice, or a median vote's replicas) travel in one call to it; a hedge, a failover or an
    audit asks another node for one branch (whose cache is likely behind: its replay stays
    apart from the other branches)."""

    def __init__(
        self, engine: Engine, batch: list[_Step], layer: int, plan: dict[int, list[Node]]
    ) -> None:
        self._engine, self._layer = engine, layer
        # Taken now: a call that outlives the layer step (a hedge's loser, an audit) replays
        # from these, while the steps themselves have moved on to the next layer's inputs.
        self._parts = _parts(batch)
        self._payloads: dict[torch.dtype, Payload] = {}  # built once for every node asked
        self._planned: dict[str, tuple[int, ...]] = {}
        for b, nodes in plan.items():
            for node in nodes:
                self._planned[node.node_id] = (*self._planned.get(node.node_id, ()), b)
        self._running: dict[tuple[str, tuple[int, ...]], asyncio.Future[dict[int, _Answer]]] = {}

    async def answer(self, node: Node, branch: int) -> _Answer:
        planned = self._planned.get(node.node_id, ())
        branches = planned if branch in planned else (branch,)
        key = (node.node_id, branches)
        shared = self._running.get(key)
        if shared is not None:
            # Shielded: a waiter that goes away must not cancel the call the others share.
            return (await asyncio.shield(shared))[branch]
        # The first asker makes the call itself (no task of its own: fan-out calls are never
        # cancelled); later askers of the same node and branches wait for its outcome.
        outcome: asyncio.Future[dict[int, _Answer]] = asyncio.get_running_loop().create_future()
        self._running[key] = outcome
        try:
            answers = await self._engine._call(
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
            payload = self._payloads[dtype] = _payload(self._layer, self._parts, dtype)
        return payload


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
        batching: BatchingConfig | None = None,
        defense: Defense | None = None,
    ) -> None:
        self.trunk = trunk
        self.registry = registry
        self.policy = policy
        self.aggregation = aggregation
        self.metrics = metrics
        self.batching = batching or BatchingConfig()
        self.defense = defense or Defense.off()
        self.slots = SessionSlots(registry.session_quota)
        self.ender = Ender(registry)
        metrics.quarantined_nodes.set_function(registry.quarantined_count)
        metrics.unended_sessions.set_function(lambda: self.ender.pending)
        self._live: dict[str, float] = {}  # session id -> when it last reached a layer
        self._at: dict[str, int] = {}  # session id -> the layer its step waits in
        with torch.no_grad():
            self.alphas = [layer.weights().detach() for layer in trunk.layers]
        self._weights = [dict(enumerate(alpha.tolist())) for alpha in self.alphas]
        unbounded = sum(len(a) for a in self.alphas) - len(self.defense.bounds)
        if self.defense.config.bounds and unbounded:
            log.warning(
                "%d branches have no output-norm bound in the manifest (exported without "
                "calibration?): they get the cross-branch norm check only",
                unbounded,
            )
        self._queues: dict[int, list[_Step]] = {}
        self._wakeups: dict[int, asyncio.Event] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}

    async def run_layer(
        self, session: Session, layer: int, start: int, h: Tensor
    ) -> tuple[Tensor, LayerReport]:
        """Fuse layer ``layer``'s branches on ``h`` (T, C) at positions ``start..start+T``."""
        out, (report,) = await self._run(session, start, h, layer, layer, head=False)
        return out, report

    async def run_token(
        self, session: Session, ids: list[int], start: int
    ) -> tuple[Tensor, list[LayerReport]]:
        """Logits (T, V) of ``ids`` at positions ``start..``: the trunk's embedding, every
        layer across the swarm, the trunk's head; what each layer's branches did."""
        with torch.no_grad():
            h = self.trunk.embed(torch.tensor([ids]), start)[0]  # (T, C)
        return await self._run(session, start, h, 0, len(self.trunk.layers) - 1, head=True)

    async def _run(
        self, session: Session, start: int, h: Tensor, first: int, last: int, head: bool
    ) -> tuple[Tensor, list[LayerReport]]:
        future: asyncio.Future[tuple[Tensor, list[LayerReport]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._enter(_Step(session, start, h, first, last, head, future))
        self._wake(first)
        return await future

    def _enter(self, step: _Step) -> None:
        """Queue ``step`` at its layer, keeping the layer's input for replays."""
        sid = step.session.session_id
        self._live[sid] = asyncio.get_running_loop().time()
        self._at[sid] = step.layer
        inputs = step.session.history.get(step.layer)
        if inputs is None:
            inputs = step.session.history[step.layer] = LayerInputs()
        inputs.record(step.start, step.h)
        self._queues.setdefault(step.layer, []).append(step)

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
        await self.ender.close()

    async def _work(self, layer: int) -> None:
        queue, wakeup = self._queues.setdefault(layer, []), self._wakeups[layer]
        limit = self.batching.max_batch_steps
        while True:
            if not queue:
                wakeup.clear()
                await wakeup.wait()
            await self._gather(layer, queue, wakeup)
            batch = [s for s in queue[:limit] if not s.future.done()]
            del queue[:limit]
            if not batch:
                continue
            try:
                results = await self._fanout(layer, batch)
            except Exception as exc:  # every step of the batch fails alike
                results = [exc] * len(batch)
            self._hand_on(layer, batch, results)

    def _hand_on(
        self,
        layer: int,
        batch: list[_Step],
        results: list[tuple[Tensor, LayerReport] | BaseException],
    ) -> None:
        """Each step of a layer's batch goes on to the next layer, or is done: its failure,
        its hidden state, or its logits (the trunk's head runs once for all of them)."""
        done: list[_Step] = []
        moved = False
        for step, result in zip(batch, results, strict=True):
            if step.future.done():  # its generation went away
                self._at.pop(step.session.session_id, None)
                continue
            if isinstance(result, BaseException):
                self._finish(step, result)
                continue
            step.h, report = result
            step.reports.append(report)
            if layer == step.last:
                done.append(step)
                continue
            step.layer = layer + 1
            try:
                self._enter(step)
                moved = True
            except Exception as exc:  # it cannot go on (e.g. a hole in its kept inputs)
                self._finish(step, exc)
        if moved:
            self._wake(layer + 1)
        heads = [step for step in done if step.head]
        try:
            logits = self._head([step.h for step in heads])
        except Exception as exc:  # the worker must live on: these steps fail, not the layer
            for step in done:
                self._finish(step, exc)
            return
        for step, out in zip(heads, logits, strict=True):
            step.h = out
        for step in done:
            self._finish(step)

    def _head(self, hidden: list[Tensor]) -> list[Tensor]:
        """The trunk's head on the last hidden states of several steps, (T_i, C) each, at once."""
        with torch.no_grad():
            if len(hidden) == 1:  # as the in-process model computes it, bit for bit
                return [self.trunk.logits(hidden[0][None])[0]]
            if not hidden:
                return []
            fused = torch.cat(hidden)[None]
            return list(self.trunk.logits(fused)[0].split([h.shape[0] for h in hidden]))

    def _finish(self, step: _Step, error: BaseException | None = None) -> None:
        self._at.pop(step.session.session_id, None)
        if error is None:
            step.future.set_result((step.h, step.reports))
        else:
            step.future.set_exception(error)

    async def _gather(self, layer: int, queue: list[_Step], wakeup: asyncio.Event) -> None:
        """Wait briefly for the other live sessions to reach this layer.

        Sessions in an earlier layer are on their way: wait for them (up to ``gather_ms``), so
        a lagging group catches up and the groups merge. Sessions in no layer are between
        tokens: wait while they keep arriving (``gather_idle_ms`` apart at most). Sessions in a
        later layer are ahead: never wait for them, or two groups would wait for each other.
        """
        cfg = self.batching
        loop = asyncio.get_running_loop()
        now = loop.time()
        end = now + cfg.gather_ms / 1000
        while now < end:
            for stale in [k for k, seen in self._live.items() if now - seen > cfg.live_after_s]:
                del self._live[stale]  # went away without ending its session
            if len(queue) >= min(len(self._live), cfg.max_batch_steps):
                return
            behind = any(at < layer for at in self._at.values())
            wait_s = end - now if behind else min(end - now, cfg.gather_idle_ms / 1000)
            wakeup.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await wakeup.wait()
            except TimeoutError:
                return  # nobody came for a while
            now = loop.time()

    async def _fanout(
        self, layer: int, batch: list[_Step]
    ) -> list[tuple[Tensor, LayerReport] | BaseException]:
        t0 = time.perf_counter()
        alpha = self.alphas[layer]
        k = alpha.numel()
        replicas = self.registry.layer_replicas(layer, k)
        asked = {
            b: self.defense.replicas_to_ask(len(nodes), (layer, b)) for b, nodes in replicas.items()
        }
        # A vote's replicas share the step's calls; an audited second replica gets its own.
        plan = {b: nodes[: asked[b] if asked[b] > 2 else 1] for b, nodes in replicas.items()}
        calls = _NodeCalls(self, batch, layer, plan)
        primary, hedges, hedge_after = {}, {}, {}
        for b, nodes in replicas.items():
            if asked[b] > 1:  # an audit (2) or a vote (3): no hedge, replicas are asked already
                primary[b] = self._voter(nodes, asked[b], calls, b)
                if asked[b] == 2:
                    self.metrics.replica_audits.labels(layer=str(layer), branch=str(b)).inc()
                continue
            # The primary fails over to the other replicas in turn when a call fails outright.
            primary[b] = self._caller(nodes, calls, b)
            if self.policy.hedge and len(nodes) > 1:
                hedges[b] = self._caller(nodes[1:2], calls, b)
                hedge_after[b] = nodes[0].p95(default_s=self.policy.request_timeout_s / 4)
        weights = self._weights[layer]
        got: Collected[int, _Answer] = await collect(
            primary, self.policy, weights=weights, hedges=hedges, hedge_after_s=hedge_after
        )
        for task in got.late_calls():
            task.add_done_callback(self._late_done)
        for b in got.answered_by_hedge:  # the late primary, when it answers, audits the hedge
            for task in got.late.get(b, ()):
                task.add_done_callback(
                    functools.partial(self._cross_check, layer, b, got.results[b])
                )
        rows = [step.h.shape[0] for step in batch]
        outputs, present, refused = self._checked_outputs(layer, k, batch, got)
        try:
            fused = aggregate(
                outputs,
                alpha,
                present,
                self.aggregation.mode,
                norm_factor=self.defense.norm_factor(layer, k, self.aggregation.norm_factor),
                trim_fraction=self.aggregation.trim_fraction,
            )
        except NoBranchAvailable as exc:
            self.metrics.quorum_failures.labels(layer=str(layer)).inc()
            raise QuorumNotReached(f"layer {layer}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        for b in got.hedged:
            self.metrics.hedges.labels(layer=str(layer), branch=str(b)).inc()
        # Steps usually share one outcome pattern: build each pattern's report once.
        patterns: list[tuple[tuple[bool, ...], tuple[bool, ...]]]
        if fused.complete:  # every branch answered and passed for every step
            patterns = [((True,) * k, (False,) * k)] * len(batch)
        else:
            rejected = fused.rejected if refused is None else fused.rejected | refused
            patterns = list(
                zip(
                    _per_step(fused.accepted, rows, all),
                    _per_step(rejected, rows, any),
                    strict=True,
                )
            )
        made: dict[tuple[tuple[bool, ...], tuple[bool, ...]], LayerReport | QuorumNotReached] = {}
        for pattern, count in Counter(patterns).items():
            made[pattern] = self._layer_report(layer, got, pattern, elapsed, count)
        lost = [r.lost_weight for r in made.values() if isinstance(r, LayerReport)]
        self.metrics.layer_step(layer, elapsed, max(lost, default=1.0), len(batch))
        results: list[tuple[Tensor, LayerReport] | BaseException] = []
        offset = 0
        for n, pattern in zip(rows, patterns, strict=True):
            report = made[pattern]
            if isinstance(report, LayerReport):
                results.append((fused.output[offset : offset + n], report))
            else:
                results.append(report)
            offset += n
        return results

    def _checked_outputs(
        self, layer: int, k: int, batch: list[_Step], got: Collected[int, _Answer]
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Every branch's outputs (K, N, C) as screened, which rows are present, and which of
        those the checks refused; ``None, None`` when every branch answered and passed (the
        healthy step, which then builds no masks)."""
        results = got.results
        single = [b for b, answer in results.items() if not answer.others]
        if len(single) == k:  # one answer from every branch (no audit, no vote)
            outputs = torch.stack([results[b].outputs for b in range(k)])
            single = list(range(k))
        else:
            n, width = sum(step.h.shape[0] for step in batch), batch[0].h.shape[1]
            outputs = torch.zeros(k, n, width, dtype=batch[0].h.dtype)
            for b in single:
                outputs[b] = results[b].outputs
        # One check for all single answers; only what fails it (or a vote) is screened alone.
        passed = dict(zip(single, self.defense.passing(layer, single, outputs), strict=True))
        if len(single) == k and all(passed.values()):
            return outputs, None, None
        present = torch.zeros(k, outputs.shape[1], dtype=torch.bool)  # (K, N)
        refused = torch.zeros_like(present)  # present, failed the checks
        for b, answer in results.items():
            if passed.get(b, False):
                present[b] = True
                continue
            screened = self._screen(layer, b, answer)
            outputs[b] = screened.output
            present[b] = ~screened.refused
            refused[b] = screened.refused
        return outputs, present, refused

    def _layer_report(
        self,
        layer: int,
        got: Collected[int, _Answer],
        pattern: tuple[tuple[bool, ...], tuple[bool, ...]],
        elapsed: float,
        steps: int,
    ) -> LayerReport | QuorumNotReached:
        """What every branch did for ``steps`` session steps that share one outcome pattern."""
        accepted, rejected = pattern
        usable = sum(accepted)
        if usable < self.policy.min_branches:
            self.metrics.quorum_failures.labels(layer=str(layer)).inc(steps)
            return QuorumNotReached(
                f"layer {layer}: {usable} branches usable, the policy needs "
                f"{self.policy.min_branches} (missing: {sorted(got.missing())})"
            )
        reports = []
        for b, (ok, refused) in enumerate(zip(accepted, rejected, strict=True)):
            answer = got.results.get(b)
            outcome = OK if ok else REJECTED if refused else MASKED
            if outcome != OK:
                self.metrics.masked.labels(layer=str(layer), branch=str(b), reason=outcome).inc(
                    steps
                )
            if answer is not None and outcome == REJECTED:
                for _ in range(steps):
                    self.metrics.branch_call(layer, b, answer.node.node_id, "rejected")
            reports.append(
                BranchReport(
                    branch=b,
                    outcome=outcome,
                    node_id=answer.node.node_id if answer else "",
                    hedged=b in got.hedged,
                    latency_s=answer.seconds if answer else got.elapsed_s,
                )
            )
        weights = self._weights[layer]
        lost = 1.0 - sum(weights[b] for b, ok in enumerate(accepted) if ok)
        return LayerReport(layer, tuple(reports), elapsed, lost)

    def _screen(self, layer: int, branch: int, answer: _Answer) -> Screened:
        """The checks on one branch's answer(s); counts and blames what they caught (a pair's
        disagreement, once it tells the liar, too), and puts a branch whose replicas disagreed
        on alert."""
        answers = [answer, *answer.others]
        screened = self.defense.screen((layer, branch), [a.outputs for a in answers])
        if screened.disagreed:
            screened = self.defense.odd_one_out(screened, [a.node.node_id for a in answers])
        if not screened.clean:
            nodes = [a.node for a in answers]
            quarantine = self.defense.config.quarantine
            account(screened, nodes, layer, branch, self.metrics, self.registry, quarantine)
            if screened.disagreed:
                self.defense.alert((layer, branch))
        return screened

    def _cross_check(
        self, layer: int, branch: int, used: _Answer, primary: asyncio.Task[_Answer]
    ) -> None:
        """A hedged step's primary answered after the hedge that was used: compare the two,
        as an audit would (a free one), and count what it shows."""
        if not _succeeded(primary) or self.defense.config.replica_check == OFF:
            return
        late = primary.result()
        if late.node is used.node or late.outputs.shape != used.outputs.shape:
            return
        self.metrics.replica_audits.labels(layer=str(layer), branch=str(branch)).inc()
        self._screen(layer, branch, replace(used, others=(late,)))

    def _voter(
        self, replicas: list[Node], asked: int, calls: _NodeCalls, branch: int
    ) -> Callable[[], Awaitable[_Answer]]:
        """Ask the first ``asked`` replicas at once (an audit, or a median vote). The answers
        in by ``replica_wait_ms`` after the first travel together, to be screened; should
        all of them fail, the remaining replicas are tried in turn."""
        wait_s = self.defense.config.replica_wait_ms / 1000
        fallback = self._caller(replicas[asked:], calls, branch) if len(replicas) > asked else None

        async def call() -> _Answer:
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(calls.answer(n, branch)) for n in replicas[:asked]]
            pending: set[asyncio.Task[_Answer]] = set(tasks)
            while pending and not any(_succeeded(t) for t in tasks):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                _, pending = await asyncio.wait(pending, timeout=wait_s)
            for task in pending:  # never cancelled: the call may fill a node's cache
                task.add_done_callback(self._late_done)
            answers = [t.result() for t in tasks if _succeeded(t)]
            if answers:
                return replace(answers[0], others=tuple(answers[1:]))
            if fallback is not None:
                return await fallback()
            raise next(e for t in tasks if (e := t.exception()) is not None)

        return call

    def _caller(
        self, replicas: list[Node], calls: _NodeCalls, branch: int
    ) -> Callable[[], Awaitable[_Answer]]:
        async def call() -> _Answer:
            for i, node in enumerate(replicas):
                try:
                    return await calls.answer(node, branch)
                except NodeCallError as exc:
                    # A refused or unreachable replica: try the next. A timeout is not retried:
                    # the policy's time is spent.
                    if i + 1 == len(replicas) or exc.code.name == "DEADLINE_EXCEEDED":
                        raise
            raise RuntimeError("no replica to call")  # unreachable: replicas is never empty

        return call

    async def _call(
        self,
        node: Node,
        parts: list[_Part],
        layer: int,
        branches: tuple[int, ...],
        shared: Callable[[torch.dtype], Payload] | None = None,
    ) -> dict[int, _Answer]:
        """One Forward to ``node`` for all of ``branches``, counted per branch."""
        for part in parts:  # asked is enough: a node may run a call its caller gave up on
            part.session.nodes.add(node.node_id)
        t0 = time.perf_counter()
        try:
            outputs = await self._forward(node, parts, layer, branches, shared)
        except NodeCallError as exc:
            if exc.code in NODE_TROUBLE:  # not a refusal of this request (an ended session)
                self.registry.failed(node)
            outcome = "timeout" if exc.code.name == "DEADLINE_EXCEEDED" else "error"
            for b in branches:
                self.metrics.branch_call(layer, b, node.node_id, outcome)
            raise
        seconds = time.perf_counter() - t0
        node.record_success(seconds)
        for b in branches:
            self.metrics.branch_call(layer, b, node.node_id, "ok", seconds)
        return {b: _Answer(outputs[b], node, seconds) for b in branches}

    async def _forward(
        self,
        node: Node,
        parts: list[_Part],
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
            self.metrics.replays.labels(node=node.node_id[:16]).inc()
            try:
                outs = await self._send(node, layer, branches, [_Part(part.session, start, replay)])
            except CacheGap as again:
                if again.length >= start:
                    raise
                refusal = again
                continue
            return {b: outs[b][-rows:] for b in branches}
        raise refusal

    async def _send(
        self,
        node: Node,
        layer: int,
        branches: tuple[int, ...],
        parts: list[_Part],
        shared: Callable[[torch.dtype], Payload] | None = None,
    ) -> dict[int, Tensor]:
        """``parts`` in one Forward, or, beyond what the node takes in one (its limits from
        ``Describe``), in several: steps split across calls, long ones in chunks, in order."""
        if any(p.session.ended for p in parts):
            # A late call (a primary failing over, a replay) after its generation ended: sent,
            # it would open the session again on a node that the end has passed already.
            raise NodeCallError(node.address, grpc.StatusCode.FAILED_PRECONDITION, "ended")
        timeout, dtype = self.policy.request_timeout_s, node.wire_dtype
        lengths = [p.h.shape[0] for p in parts]
        positions = node.limits.positions(parts[0].h.shape[1], dtype.itemsize, len(branches))
        if fits(lengths, node.limits.max_steps, positions):
            payload = shared(dtype) if shared is not None else _payload(layer, parts, dtype)
            outs, _ = await node.client.send(payload, branches, timeout)
            self.metrics.wire(len(payload.data), outs, dtype)
            return outs
        pieces: dict[int, list[Tensor]] = {b: [] for b in branches}
        for call in plan_calls(lengths, node.limits.max_steps, positions):
            chunk = [
                _Part(
                    parts[c.step].session,
                    parts[c.step].start + c.offset,
                    parts[c.step].h[c.offset : c.offset + c.length],
                )
                for c in call
            ]
            payload = _payload(layer, chunk, dtype)
            outs, _ = await node.client.send(payload, branches, timeout)
            self.metrics.wire(len(payload.data), outs, dtype)
            for b in branches:
                pieces[b].append(outs[b])
        return {b: torch.cat(pieces[b]) for b in branches}

    @staticmethod
    def _late_done(task: asyncio.Task[_Answer]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a late failure was already counted in _call

    async def open_session(self) -> Session:
        """A new session, once this gateway is below every node's session quota (it waits
        for a slot rather than have a node refuse the session)."""
        await self.slots.acquire()
        return Session(holds_slot=True)

    async def end_session(self, session: Session) -> None:
        """Release the session's caches on every node that took part (nodes that do not
        answer are retried in the background), then its slot."""
        session.ended = True
        self._live.pop(session.session_id, None)
        self._at.pop(session.session_id, None)
        try:
            await self.ender.end(session)
        finally:
            if session.holds_slot:
                session.holds_slot = False
                self.slots.release()
