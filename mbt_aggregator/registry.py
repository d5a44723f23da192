"""Admitted nodes and, for every (layer, branch), its replicas with health and latency.

Replica choice prefers healthy replicas with the lowest recent latency, so on heterogeneous
machines the fast replica carries the load. A replica that fails is benched for a back-off
period (doubling with consecutive failures) and then tried again; a success clears it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mbt_aggregator.client import NodeClient

BranchKey = tuple[int, int]
_WINDOW = 64  # latencies kept per node for the p95 used as hedge delay


@dataclass
class Node:
    node_id: str
    address: str
    client: NodeClient
    branches: frozenset[BranchKey]
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    failures: int = 0
    benched_until: float = 0.0

    def record_success(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.failures = 0
        self.benched_until = 0.0

    def record_failure(self, now: float, base_backoff_s: float) -> None:
        self.failures += 1
        self.benched_until = now + base_backoff_s * 2 ** min(self.failures - 1, 6)

    def usable(self, now: float) -> bool:
        return now >= self.benched_until

    def latency_estimate(self) -> float:
        """Median of recent calls (0 before any: a new node gets tried)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[len(ordered) // 2]

    def p95(self, default_s: float) -> float:
        if len(self.latencies) < 5:
            return default_s
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class Registry:
    def __init__(self, backoff_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._nodes: dict[str, Node] = {}
        self._backoff_s = backoff_s
        self._clock = clock

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def by_address(self, address: str) -> Node | None:
        return next((n for n in self._nodes.values() if n.address == address), None)

    def add(self, node: Node) -> Node | None:
        """Admit ``node``; returns the node it replaces (same id), if any."""
        old = self._nodes.get(node.node_id)
        self._nodes[node.node_id] = node
        return old

    def remove(self, node_id: str) -> Node | None:
        return self._nodes.pop(node_id, None)

    def replicas(self, key: BranchKey) -> list[Node]:
        """Usable replicas of one branch, fastest first."""
        now = self._clock()
        found = [n for n in self._nodes.values() if key in n.branches and n.usable(now)]
        return sorted(found, key=lambda n: (n.failures, n.latency_estimate()))

    def live_replicas(self, key: BranchKey) -> int:
        now = self._clock()
        return sum(1 for n in self._nodes.values() if key in n.branches and n.usable(now))

    def failed(self, node: Node) -> None:
        node.record_failure(self._clock(), self._backoff_s)
