"""Keeps the registry in step with the swarm: admits candidates, drops nodes that vanish.

Candidates come from a static peer list (retried until admitted; for networks where multicast
does not reach, and for Kubernetes) and from mDNS. A health loop describes every admitted node;
one that fails ``max_failures`` checks in a row leaves the registry and may re-enter later, and
one whose address now answers with another node id or manifest (a restart, new artifacts)
leaves at once: the newcomer there is admitted only once it passes admission itself.
With TLS every candidate proves its node id first (see :mod:`mbt_aggregator.admission`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mbt_aggregator.admission import Expectation, Rejected, admit
from mbt_aggregator.client import NodeCallError
from mbt_aggregator.identity import ClusterTls
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.registry import Registry

log = logging.getLogger("mbt_aggregator")


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
    ) -> None:
        self.registry = registry
        self.expect = expect
        self.metrics = metrics
        self.peers = list(peers)
        self.admit_timeout_s = admit_timeout_s
        self.health_interval_s = health_interval_s
        self.max_failures = max_failures
        self.tls = tls
        self._health_failures: dict[str, int] = {}
        self._pending: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()  # set whenever a node enters or leaves

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._peer_loop()),
            asyncio.create_task(self._health_loop()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for node in self.registry.nodes:
            await node.client.close()

    async def offer(self, address: str, source: str, claimed_id: str | None = None) -> None:
        """Try to admit the node at ``address`` (no-op when it is admitted or being checked);
        ``claimed_id`` is the id its mDNS record announced (None for a static peer)."""
        if address in self._pending or self.registry.by_address(address) is not None:
            return
        self._pending.add(address)
        self.metrics.nodes_discovered.labels(source=source).inc()
        try:
            node = await admit(address, self.expect, self.admit_timeout_s, self.tls, claimed_id)
        except Rejected as exc:
            self.metrics.nodes_rejected.labels(reason=exc.reason).inc()
            log.warning("%s", exc)
            return
        finally:
            self._pending.discard(address)
        replaced = self.registry.add(node)
        if replaced is not None and replaced.address != node.address:
            await replaced.client.close()
        self._health_failures[node.node_id] = 0
        self.metrics.nodes_admitted.inc()
        self.changed.set()
        log.warning(
            "admitted node %s at %s serving %s",
            node.node_id[:16],
            address,
            ",".join(f"{lay}:{b}" for lay, b in sorted(node.branches)),
        )

    async def forget(self, address: str, why: str) -> None:
        node = self.registry.by_address(address)
        if node is None:
            return
        self.registry.remove(node.node_id)
        await node.client.close()
        self.changed.set()
        log.warning("node %s at %s left: %s", node.node_id[:16], address, why)

    async def _peer_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.offer(p, "static") for p in self.peers))
            await asyncio.sleep(self.health_interval_s)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._check(n.node_id) for n in self.registry.nodes))

    async def _check(self, node_id: str) -> None:
        node = self.registry.get(node_id)
        if node is None:
            return
        try:
            info = await node.client.describe(timeout_s=self.admit_timeout_s)
        except NodeCallError as exc:
            failures = self._health_failures.get(node_id, 0) + 1
            self._health_failures[node_id] = failures
            if failures >= self.max_failures:
                await self.forget(
                    node.address, f"{failures} failed health checks ({exc.code.name})"
                )
            return
        if info.node_id != node_id or info.manifest_sha256 != self.expect.manifest_sha256:
            # Another process answers at the address (a restart with a new identity, or other
            # artifacts): what was admitted is gone, and the newcomer must pass admission.
            await self.forget(node.address, f"node {info.node_id[:16]} answers there now")
            await self.offer(node.address, "recheck")
            return
        self._health_failures[node_id] = 0
