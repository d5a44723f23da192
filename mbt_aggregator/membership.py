"""Keeps the registry in step with the swarm: admits candidates, drops nodes that vanish.

Candidates come from a static peer list (for networks where multicast does not reach, and
for Kubernetes) and from mDNS. Every address so learnt is watched: while nothing is admitted
there it is tried again, with a back-off that doubles up to ``retry_cap_s``, so a node that
was down (or paused, or partitioned) comes back as soon as it answers again. A health loop
checks every admitted node (its gRPC health status and ``Describe``); one that fails
``max_failures`` checks in a row leaves the registry, and one whose address now answers with
another node id or manifest (a restart, new artifacts) leaves at once: the newcomer there is
admitted only once it passes admission itself.

Nothing a LAN host can send displaces a node that is healthy where it is, with or without TLS:

- a candidate that claims the id of an admitted node at another address is refused
  (``reason="conflict"``) while that node answers its health check; if it does not, the id has
  moved (or was taken while the node was away) and the candidate replaces it;
- the address a node id was healthy at before it left (failed health checks) or was displaced
  is its home for ``HOME_KEPT_S``: it stays watched, retried every health interval, and a node
  that answers there again under that id is reinstated, dropping whoever took the id meanwhile.
  Without TLS nothing proves which of two claimants is genuine: the first one holds;
- an mDNS goodbye (or a vanished record) drops a node only once a health check confirms that
  it no longer answers: anyone can forge a goodbye.

Logs are for operators: admissions and departures at INFO; a candidate that keeps failing is
logged at WARNING when it goes down, then at most once a minute with a count, and at INFO when
it comes back. With TLS every candidate proves its node id first (see
:mod:`mbt_aggregator.admission`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mbt_aggregator.admission import Expectation, Rejected, admit
from mbt_aggregator.identity import ClusterTls
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.registry import Node, Registry
from mbt_core.errors import NodeCallError, NodeUnavailable

log = logging.getLogger("mbt_aggregator")
REPEAT_LOG_S = 60.0  # a candidate that keeps failing is logged again at most this often
HOME_KEPT_S = 3600.0  # how long the address a node id left from is watched as its home


@dataclass
class _Watched:
    """An address to admit a node from, and how trying it went."""

    source: str  # static | mdns | home | recheck
    claimed_id: str | None  # the id its record announced (None: a static peer)
    failures: int = 0
    next_try: float = 0.0
    down_since: float | None = None
    reason: str = ""
    logged_at: float = 0.0
    unlogged: int = 0  # failures since the last log line
    until: float = float("inf")


class Membership:
    def __init__(
        self,
        registry: Registry,
        expect: Expectation,
        metrics: Metrics,
        peers: Sequence[str] = (),
        admit_timeout_s: float = 2.0,
        health_interval_s: float = 1.0,
        max_failures: int = 2,
        tls: ClusterTls | None = None,
        wire_dtype: torch.dtype | None = None,
        retry_cap_s: float = 30.0,
        repeat_log_s: float = REPEAT_LOG_S,
    ) -> None:
        self.registry = registry
        self.expect = expect
        self.metrics = metrics
        self.peers = list(peers)
        self.admit_timeout_s = admit_timeout_s
        self.health_interval_s = health_interval_s
        self.max_failures = max_failures
        self.tls = tls
        self.wire_dtype = wire_dtype
        self.retry_cap_s = retry_cap_s
        self.repeat_log_s = repeat_log_s
        self._health_failures: dict[str, int] = {}
        self._pending: set[str] = set()
        self._watched: dict[str, _Watched] = {}
        self._homes: dict[str, tuple[str, float]] = {}  # node id -> (address it left, until)
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()  # set whenever a node enters or leaves

    async def start(self) -> None:
        for peer in self.peers:
            self._watch(peer, "static", None)
        self._tasks = [
            asyncio.create_task(self._watch_loop()),
            asyncio.create_task(self._health_loop()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for node in self.registry.nodes:
            await node.client.close()

    def expect_now(self, expect: Expectation) -> None:
        """Admit against ``expect`` from now on (a live expansion, or its rollback): admitted
        nodes that no longer match leave at their next health check, and every address that
        was refused is tried again at once."""
        self.expect = expect
        for watched in self._watched.values():
            watched.next_try = 0.0

    async def offer(self, address: str, source: str, claimed_id: str | None = None) -> None:
        """Watch ``address`` and try to admit the node there now (no-op when one is admitted
        there or being checked); ``claimed_id`` is the id its mDNS record announced."""
        self._watch(address, source, claimed_id)
        await self._try(address)

    async def lost(self, address: str, why: str) -> None:
        """A record says the node at ``address`` left (an mDNS goodbye): believed only once
        the node stops answering its health check."""
        node = self.registry.by_address(address)
        if node is not None and await self._serving(node):
            self.metrics.membership_events.labels(event="goodbye_ignored").inc()
            log.warning(
                "ignored %s of node %s at %s: it still answers its health check (forged?)",
                why,
                node.node_id[:16],
                address,
            )
            return
        watched = self._watched.get(address)
        if watched is not None and watched.source == "mdns":
            del self._watched[address]
        if node is not None:
            await self._drop(node, why, logging.INFO)

    # -- admission -------------------------------------------------------------------------

    def _watch(self, address: str, source: str, claimed_id: str | None) -> None:
        watched = self._watched.get(address)
        if watched is None:
            self._watched[address] = _Watched(source, claimed_id)
            self.metrics.nodes_discovered.labels(source=source).inc()
        elif source == "mdns" and watched.source != "static":
            watched.source, watched.claimed_id = source, claimed_id  # a fresh announcement
            watched.next_try = 0.0

    async def _try(self, address: str) -> None:
        watched = self._watched.get(address)
        if (
            watched is None
            or address in self._pending
            or self.registry.by_address(address) is not None
        ):
            return
        self._pending.add(address)
        try:
            try:
                node = await admit(
                    address,
                    self.expect,
                    self.admit_timeout_s,
                    self.tls,
                    watched.claimed_id,
                    self.wire_dtype,
                )
            except Rejected as exc:
                self._rejected(address, watched, exc)
                return
            if not await self._take_place(node):
                await node.client.close()
                self._rejected(
                    address,
                    watched,
                    Rejected(
                        address,
                        "conflict",
                        f"claims node id {node.node_id[:16]}, which is healthy at "
                        f"{self._address_of(node.node_id)}",
                    ),
                )
                return
        finally:
            self._pending.discard(address)
        if watched.down_since is not None:
            log.info("node at %s answers again (%d failed tries)", address, watched.failures)
        watched.failures, watched.down_since, watched.reason = 0, None, ""
        self._health_failures[node.node_id] = node.failed_checks = 0
        self.metrics.admitted(node.node_id, node.branches)
        self.changed.set()
        log.info(
            "admitted node %s at %s serving %s",
            node.node_id[:16],
            address,
            ",".join(f"{lay}:{b}" for lay, b in sorted(node.branches)),
        )

    def _address_of(self, node_id: str) -> str:
        node = self.registry.get(node_id)
        return node.address if node is not None else "?"

    async def _take_place(self, node: Node) -> bool:
        """Put ``node`` in the registry unless its id is healthy at another address."""
        current = self.registry.get(node.node_id)
        at_home = self._home_of(node.node_id) == node.address
        if at_home:
            del self._homes[node.node_id]
        if current is None or current.address == node.address:
            self.registry.add(node)
            return True
        events = self.metrics.membership_events
        if at_home:
            events.labels(event="reinstated").inc()
            log.warning(
                "node %s is back at %s: reinstated, dropping %s, which took its id meanwhile",
                node.node_id[:16],
                node.address,
                current.address,
            )
            self._replace(current, node)
            return True
        if await self._serving(current):
            events.labels(event="id_conflict").inc()
            return False
        events.labels(event="displaced").inc()
        log.warning(
            "node %s moved from %s (not answering) to %s; the old address stays watched",
            node.node_id[:16],
            current.address,
            node.address,
        )
        self._keep_home(current)
        self._replace(current, node)
        return True

    def _home_of(self, node_id: str) -> str | None:
        home = self._homes.get(node_id)
        return home[0] if home is not None and home[1] > self._now() else None

    def _keep_home(self, node: Node) -> None:
        """Remember where ``node`` was healthy, and watch that address."""
        until = self._now() + HOME_KEPT_S
        self._homes[node.node_id] = (node.address, until)
        watched = self._watched.get(node.address)
        if watched is None or watched.source == "home":
            self._watched[node.address] = _Watched("home", node.node_id, until=until)

    def _replace(self, current: Node, node: Node) -> None:
        self.registry.add(node)  # same id: takes current's place
        task = asyncio.get_running_loop().create_task(current.client.close())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _rejected(self, address: str, watched: _Watched, exc: Rejected) -> None:
        """Count, back off, and log once when it starts failing (or fails otherwise), then at
        most once every ``repeat_log_s`` with the count in between."""
        self.metrics.nodes_rejected.labels(reason=exc.reason).inc()
        now = self._now()
        watched.failures += 1
        backoff = self.health_interval_s * 2 ** min(watched.failures - 1, 16)
        if address in {a for a, _ in self._homes.values()}:
            backoff = self.health_interval_s  # a home is tried at every beat: a quick return
        watched.next_try = now + min(backoff, self.retry_cap_s)
        if watched.down_since is None or exc.reason != watched.reason:
            watched.down_since, watched.reason = now, exc.reason
            watched.logged_at, watched.unlogged = now, 0
            log.warning("%s", exc)
        elif now - watched.logged_at >= self.repeat_log_s:
            log.warning("%s (%d more tries failed alike)", exc, watched.unlogged + 1)
            watched.logged_at, watched.unlogged = now, 0
        else:
            watched.unlogged += 1

    async def _watch_loop(self) -> None:
        while True:
            now = self._now()
            for address in [a for a, w in self._watched.items() if now > w.until]:
                del self._watched[address]
            due = [a for a, w in self._watched.items() if w.next_try <= now]
            await asyncio.gather(*(self._try(a) for a in due))
            await asyncio.sleep(self.health_interval_s)

    # -- health ----------------------------------------------------------------------------

    async def _serving(self, node: Node) -> bool:
        """Whether ``node`` answers where it is: health SERVING, and ``Describe`` with its
        own id and the expected manifest."""
        if not await node.client.serving(self.admit_timeout_s):
            return False
        try:
            info = await node.client.describe(timeout_s=self.admit_timeout_s)
        except NodeCallError:
            return False
        return info.node_id == node.node_id and self.expect.serves(
            info.model_version, info.manifest_sha256
        )

    async def _drop(self, node: Node, why: str, level: int) -> None:
        if self.registry.get(node.node_id) is node:
            self.registry.remove(node.node_id)
        await node.client.close()
        self.changed.set()
        log.log(level, "node %s at %s left: %s", node.node_id[:16], node.address, why)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._check(n) for n in self.registry.nodes))

    async def _check(self, node: Node) -> None:
        if self.registry.get(node.node_id) is not node:
            return
        try:
            if not await node.client.serving(self.admit_timeout_s):
                raise NodeUnavailable(node.address, "not serving")
            info = await node.client.describe(timeout_s=self.admit_timeout_s)
        except NodeCallError as exc:
            failures = self._health_failures.get(node.node_id, 0) + 1
            self._health_failures[node.node_id] = node.failed_checks = failures
            if failures >= self.max_failures:
                self._keep_home(node)
                await self._drop(
                    node, f"{failures} failed health checks ({exc.status})", logging.WARNING
                )
            return
        if info.node_id != node.node_id or not self.expect.serves(
            info.model_version, info.manifest_sha256
        ):
            # Another process answers at the address (a restart with a new identity, or other
            # artifacts): what was admitted is gone, and the newcomer must pass admission.
            await self._drop(node, f"node {info.node_id[:16]} answers there now", logging.INFO)
            self._watch(node.address, "recheck", None)
            await self._try(node.address)
            return
        self._health_failures[node.node_id] = node.failed_checks = 0

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
