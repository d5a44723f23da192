"""The layer scheduler: steps of concurrent generations that reach the same layer are merged,
one ``Forward`` per branch carrying all of them (continuous batching).

Each layer has a queue and a worker: the worker gathers what arrives, hands the batch to the
:class:`~mbt_aggregator.fanout.Fanout` (the nodes' answers, screened, fused and reported), and
hands every step on to the next layer, or runs the trunk's head once for all that are done.
The trunk's embedding and head run here; everything that talks to nodes is below the fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from mbt_aggregator.defense import Defense
from mbt_aggregator.fanout import Fanout, Part
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.mix import FusionWeights
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.recent import BranchOutcomes
from mbt_aggregator.registry import Registry
from mbt_aggregator.reports import LayerReport, StepResult
from mbt_aggregator.session import Ender, LayerInputs, LayerPass, Session, SessionSlots
from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.wire.contract import BranchKey

log = logging.getLogger("mbt_aggregator")


@dataclass(frozen=True)
class GatherConfig:
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


@dataclass(frozen=True)
class NodeState:
    """One admitted node as the registry sees it."""

    node_id: str
    address: str
    branches: tuple[BranchKey, ...]
    healthy: bool  # answering, not quarantined
    latency_s: float


@dataclass(frozen=True)
class BranchState:
    """One branch of the model: how many replicas serve it now, and its weight."""

    layer: int
    branch: int
    live_replicas: int
    weight: float  # its alpha in the trunk
    recent: BranchOutcomes | None = None  # over the recent steps; None before the first


@dataclass(frozen=True)
class EngineStatus:
    """What the gateway's Status reports: the nodes, every branch's replicas, the policy."""

    nodes: tuple[NodeState, ...]
    branches: tuple[BranchState, ...]
    policy: str


class Engine:
    """Layer steps across the swarm, scheduled per layer (see the module's docstring)."""

    def __init__(
        self,
        trunk: MBTLanguageModel,
        registry: Registry,
        policy: FanoutPolicy,
        aggregation: AggregationConfig,
        metrics: Metrics,
        gather: GatherConfig | None = None,
        defense: Defense | None = None,
    ) -> None:
        self.trunk = trunk
        # The trunk may sit on a GPU; hidden states cross the network, so fusion stays on the
        # CPU and only the embedding, head and sampling run on the trunk's device.
        self.device = trunk.tok_emb.weight.device
        self.registry = registry
        self.gather = gather or GatherConfig()
        self.defense = defense or Defense.off()
        self.defense.bind(metrics, registry)
        self.slots = SessionSlots(registry.session_quota)
        self.ender = Ender(registry)
        metrics.watch(quarantined=registry.quarantined_count, unended=lambda: self.ender.pending)
        self._policy = repr(policy)
        self._recent = metrics.recent
        with torch.no_grad():
            alphas = [layer.weights().detach().cpu() for layer in trunk.layers]
        self.weights = FusionWeights(alphas)  # what the layers fuse with (an expansion blends)
        self.fanout = Fanout(registry, policy, aggregation, self.defense, metrics, self.weights)
        self._live: dict[str, float] = {}  # session id -> when it last reached a layer
        self._at: dict[str, int] = {}  # session id -> the layer its step waits in
        unbounded = sum(len(a) for a in alphas) - len(self.defense.bounds)
        if self.defense.config.bounds and unbounded:
            log.warning(
                "%d branches have no output-norm bound in the manifest (exported without "
                "calibration?): they get the cross-branch norm check only",
                unbounded,
            )
        self._queues: dict[int, list[LayerPass]] = {}
        self._wakeups: dict[int, asyncio.Event] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}

    async def run_layer(
        self, session: Session, layer: int, start: int, h: Tensor
    ) -> tuple[Tensor, LayerReport]:
        """Fuse layer ``layer``'s branches on ``h`` (T, C) at positions ``start..start+T``."""
        done = await self._run(session, start, h, layer, layer, head=False)
        return done.hidden, done.reports[0]

    async def run_token(
        self, session: Session, ids: list[int], start: int
    ) -> tuple[Tensor, list[LayerReport]]:
        """Logits (T, V) of ``ids`` at positions ``start..``: the trunk's embedding, every
        layer across the swarm, the trunk's head; what each layer's branches did."""
        with torch.no_grad():
            h = self.trunk.embed(torch.tensor([ids], device=self.device), start)[0].cpu()
        done = await self._run(session, start, h, 0, len(self.trunk.layers) - 1, head=True)
        assert done.logits is not None  # the head ran
        return done.logits, done.reports

    async def _run(
        self, session: Session, start: int, h: Tensor, first: int, last: int, head: bool
    ) -> LayerPass:
        future: asyncio.Future[LayerPass] = asyncio.get_running_loop().create_future()
        self._enter(LayerPass(session, start, h, first, last, head, future))
        self._wake(first)
        return await future

    def _enter(self, step: LayerPass) -> None:
        """Queue ``step`` at its layer, keeping the layer's input for replays."""
        sid = step.session.session_id
        self._live[sid] = asyncio.get_running_loop().time()
        self._at[sid] = step.layer
        inputs = step.session.history.get(step.layer)
        if inputs is None:
            inputs = step.session.history[step.layer] = LayerInputs()
        inputs.record(step.start, step.hidden)
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
        limit = self.gather.max_batch_steps
        while True:
            if not queue:
                wakeup.clear()
                await wakeup.wait()
            await self._gather(layer, queue, wakeup)
            batch = [s for s in queue[:limit] if not s.future.done()]
            del queue[:limit]
            if not batch:
                continue
            parts = [Part(s.session, s.start, s.hidden) for s in batch]
            try:
                results = await self.fanout.step(layer, parts)
            except Exception as exc:  # every step of the batch fails alike
                results = [exc] * len(batch)
            self._hand_on(layer, batch, results)

    def _hand_on(self, layer: int, batch: list[LayerPass], results: list[StepResult]) -> None:
        """Each step of a layer's batch goes on to the next layer, or is done: its failure,
        its hidden state, or its logits (the trunk's head runs once for all of them)."""
        done: list[LayerPass] = []
        moved = False
        for step, result in zip(batch, results, strict=True):
            if step.future.done():  # its generation went away
                self._at.pop(step.session.session_id, None)
                continue
            if isinstance(result, BaseException):
                self._finish(step, result)
                continue
            step.hidden, report = result
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
            logits = self._head([step.hidden for step in heads])
        except Exception as exc:  # the worker must live on: these steps fail, not the layer
            for step in done:
                self._finish(step, exc)
            return
        for step, out in zip(heads, logits, strict=True):
            step.logits = out
        for step in done:
            self._finish(step)

    def _head(self, hidden: list[Tensor]) -> list[Tensor]:
        """The trunk's head on the last hidden states of several steps, (T_i, C) each, at once."""
        with torch.no_grad():
            if len(hidden) == 1:  # as the in-process model computes it, bit for bit
                return [self.trunk.logits(self._to_trunk(hidden[0][None]))[0]]
            if not hidden:
                return []
            fused = self._to_trunk(torch.cat(hidden)[None])
            return list(self.trunk.logits(fused)[0].split([h.shape[0] for h in hidden]))

    def _to_trunk(self, hidden: Tensor) -> Tensor:
        """Fused (float32, CPU) hidden states as the head takes them: on the trunk's device,
        rounded to its dtype, as the in-process model rounds each fused layer output."""
        return hidden.to(self.device, self.trunk.tok_emb.weight.dtype)

    def _finish(self, step: LayerPass, error: BaseException | None = None) -> None:
        self._at.pop(step.session.session_id, None)
        if error is None:
            step.future.set_result(step)
        else:
            step.future.set_exception(error)

    async def _gather(self, layer: int, queue: list[LayerPass], wakeup: asyncio.Event) -> None:
        """Wait briefly for the other live sessions to reach this layer.

        Sessions in an earlier layer are on their way: wait for them (up to ``gather_ms``), so
        a lagging group catches up and the groups merge. Sessions in no layer are between
        tokens: wait while they keep arriving (``gather_idle_ms`` apart at most). Sessions in a
        later layer are ahead: never wait for them, or two groups would wait for each other.
        """
        cfg = self.gather
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

    def status(self) -> EngineStatus:
        """What the gateway's Status reports: the nodes as the registry sees them, each
        branch's live replicas, weight and recent outcomes, the fan-out policy."""
        registry = self.registry
        recent = self._recent.outcomes()
        nodes = tuple(
            NodeState(
                node_id=n.node_id,
                address=n.address,
                branches=tuple(sorted(n.branches)),
                healthy=not (n.failures or n.failed_checks or registry.quarantined(n.node_id)),
                latency_s=n.latency_estimate(),
            )
            for n in registry.nodes
        )
        branches = tuple(
            BranchState(
                lay, b, registry.live_replicas((lay, b)), float(alpha[b]), recent.get((lay, b))
            )
            for lay, alpha in enumerate(self.weights.shown())
            for b in range(alpha.numel())
        )
        return EngineStatus(nodes, branches, self._policy)

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
