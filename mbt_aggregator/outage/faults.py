"""Fault events applied to a running cluster, on a timeline, and the way back to healthy.

:class:`Injector` does one thing to one node (blocking: a restart waits for the new process
to serve). :class:`Disruptor` plays a scenario's timed events against the workload's clock
from the bench's event loop (blocking steps in a thread, so tokens keep streaming), and
records when each fault and recovery happened and which node ids a node slot had, for the
time-to-mask and time-to-recover figures. :meth:`Injector.restore` brings every node back to
what the next scenario needs (restarting only nodes that are dead or run other options).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mbt_aggregator.outage.netns import NetnsLab
from mbt_aggregator.outage.scenario import FaultEvent, Scenario
from mbt_core.cluster.local import LocalCluster
from mbt_core.model.checkpoint import Checkpoint

ENDED = ("complete", "frozen", "rolled_back", "refused")  # an expansion's ramp is over
TEST_FAULTS_ENV = "MBT_ENABLE_TEST_FAULTS"  # mbt_node.faults.ENABLE_ENV (no node import here)


@dataclass(frozen=True)
class NodeSetup:
    """A node's start options for one scenario: extra CLI arguments and environment."""

    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def node_setups(scenario: Scenario, n_nodes: int, seed: int) -> list[NodeSetup]:
    """Start options per node: ``slow`` -> ``--delay-ms``, ``corrupt`` -> the test fault."""
    args: list[list[str]] = [[] for _ in range(n_nodes)]
    env: list[dict[str, str]] = [{} for _ in range(n_nodes)]
    for e in scenario.events:
        if e.node is None:
            raise ValueError("resolve the scenario's random nodes first")
        if e.action == "slow":
            args[e.node] += ["--delay-ms", f"{e.delay_ms:g}"]
        elif e.action == "corrupt":
            spec = f"corrupt={e.mode},rate={e.rate:g},seed={seed}"
            args[e.node] += ["--unsafe-test-fault", spec]
            env[e.node][TEST_FAULTS_ENV] = "1"
    return [NodeSetup(tuple(a), tuple(sorted(v.items()))) for a, v in zip(args, env, strict=True)]


class Injector:
    def __init__(
        self,
        cluster: LocalCluster,
        lab: NetnsLab | None = None,
        grow: Callable[[FaultEvent], Checkpoint] | None = None,
    ) -> None:
        self.cluster = cluster
        self.lab = lab
        self.grow = grow  # the grown model an ``expand`` event publishes

    def expand(self, e: FaultEvent, timeout_s: float = 60.0) -> str:
        """Grow the served model live (:meth:`LocalCluster.expand`) and wait until the
        gateway's ramp is over; returns how it ended (complete, frozen, rolled_back)."""
        if self.grow is None:
            raise ValueError("this bench cannot grow its model (no grown checkpoint)")
        self.cluster.expand(self.grow(e))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.cluster.status().expansion.state
            if state in ENDED:
                return state
            time.sleep(0.2)
        return "timeout"

    def inject(self, action: str, node: int, rate_kbit: int = 0) -> None:
        if action == "kill":
            self.cluster.kill_node(node)
        elif action == "pause":
            self.cluster.pause_node(node)
        elif action in ("partition", "slow_link"):
            if self.lab is None:
                raise ValueError(f"{action} needs --netns")
            if action == "partition":
                self.lab.partition(node)
            else:
                self.lab.shape(node, rate_kbit)
        else:
            raise ValueError(f"{action} is not a timed fault")

    def recover(self, action: str, node: int) -> str:
        """Undo ``action`` on ``node``; returns the node's id afterwards (new after a restart)."""
        if action == "kill":
            self.cluster.restart_node(node)
        elif action == "pause":
            self.cluster.resume_node(node)
        elif self.lab is not None and action == "partition":
            self.lab.heal(node)
        elif self.lab is not None and action == "slow_link":
            self.lab.unshape(node)
        return self.cluster.node_ids[node]

    def restore(self, setups: list[NodeSetup]) -> int:
        """Every node running, resumed, connected and started with ``setups``; returns how many
        nodes had to be restarted."""
        restarted = 0
        for i, setup in enumerate(setups):
            if self.lab is not None:
                self.lab.heal(i)
                self.lab.unshape(i)
            if self.cluster.node_running(i):
                self.cluster.resume_node(i)  # harmless when it runs
            env = dict(setup.env)
            if (
                not self.cluster.node_running(i)
                or self.cluster.node_extra[i] != setup.args
                or self.cluster.node_env[i] != env
            ):
                self.cluster.restart_node(i, setup.args, env)
                restarted += 1
        return restarted


@dataclass
class Episode:
    """One fault on one node slot and, if scheduled, its recovery (seconds after t0)."""

    node: int
    action: str
    injected_s: float
    recovered_s: float | None = None  # when the recovery began (restart, SIGCONT, link up)


@dataclass
class Marker:
    t_s: float
    kind: str  # "fault" or "recover"; "expand", then how its ramp ended
    node: int
    action: str


@dataclass
class Disruptor:
    """Plays one scenario's events; ``ids[i]`` collects every node id slot ``i`` had."""

    injector: Injector
    scenario: Scenario
    ids: list[set[str]]
    episodes: list[Episode] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    fault_applied: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _t0: float = 0.0

    def start(self, t0: float) -> None:
        self._t0 = t0
        for e in self.scenario.events:
            if not e.timed:  # a start option: in force from the start
                self.episodes.append(Episode(_node(e), e.action, 0.0))
            else:
                self._tasks.append(asyncio.create_task(self._play(e)))

    async def cancel(self) -> None:
        """Stop playing (the run is over); a blocking step under way still completes."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def settled(self, last_seen: Mapping[str, float]) -> bool:
        """Every step played, and every recovered node used by a token since its recovery."""
        if not all(t.done() for t in self._tasks):
            return False
        return all(
            any(last_seen.get(i, -1.0) >= ep.recovered_s for i in self.ids[ep.node])
            for ep in self.episodes
            if ep.recovered_s is not None
        )

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _sleep_until(self, t_s: float) -> None:
        await asyncio.sleep(max(0.0, t_s - self._now()))

    async def _play(self, e: FaultEvent) -> None:
        node = _node(e)
        await self._sleep_until(e.at_s)
        if e.action == "expand":  # on the whole cluster: a marker, no episode of a node
            self.markers.append(Marker(self._now(), "expand", -1, "expand"))
            self.fault_applied.set()
            ended = await asyncio.to_thread(self.injector.expand, e)
            self.markers.append(Marker(self._now(), ended, -1, "expand"))
            return
        if e.action == "flap":
            for _ in range(e.cycles):
                episode = await self._inject(e.via, node, e)
                await asyncio.sleep(e.down_s)
                await self._recover(e.via, node, episode)
                await asyncio.sleep(e.up_s)
            return
        episode = await self._inject(e.action, node, e)
        if e.recover_after_s is not None:
            await asyncio.sleep(e.recover_after_s)
            await self._recover(e.action, node, episode)

    async def _inject(self, action: str, node: int, e: FaultEvent) -> Episode:
        await asyncio.to_thread(self.injector.inject, action, node, e.rate_kbit)
        episode = Episode(node, action, self._now())
        self.episodes.append(episode)
        self.markers.append(Marker(episode.injected_s, "fault", node, action))
        self.fault_applied.set()
        return episode

    async def _recover(self, action: str, node: int, episode: Episode) -> None:
        episode.recovered_s = self._now()
        self.markers.append(Marker(episode.recovered_s, "recover", node, action))
        self.ids[node].add(await asyncio.to_thread(self.injector.recover, action, node))


def _node(e: FaultEvent) -> int:
    if e.node is None:
        raise ValueError("resolve the scenario's random nodes first")
    return e.node
