"""Admitted nodes and, for every (layer, branch), its replicas with health and latency.

Replica choice prefers healthy replicas with the lowest recent latency, so on heterogeneous
machines the fast replica carries the load. A replica that fails is benched for a back-off
period (doubling with consecutive failures) and then tried again; a success clears it.

A node whose outputs keep being rejected (bounds, replica votes: ``mbt_aggregator.defense``)
is quarantined instead: it answers, but wrongly, so a success must not clear it. Its record is
kept by node id, so leaving and re-entering the registry does not wash it clean.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mbt_aggregator.client import NodeClient
from mbt_aggregator.fit import CallLimits
from mbt_core.wire.contract import BranchKey

_WINDOW = 64  # latencies kept per node for the p95 used as hedge delay


@dataclass
class Node:
    node_id: str
    address: str
    client: NodeClient
    branches: frozenset[BranchKey]
    limits: CallLimits = field(default_factory=CallLimits)  # what one Forward may carry
    wire_dtype: torch.dtype = torch.float32  # what its layer inputs and outputs travel in
    session_quota: int = 1 << 30  # sessions this gateway may hold on it (its per-caller quota)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    failures: int = 0  # calls failed in a row
    benched_until: float = 0.0
    failed_checks: int = 0  # health checks failed in a row (membership's), before it leaves

    # The median of ``latencies``, kept until the next call is recorded.
    _median: float | None = field(default=None, init=False, repr=False, compare=False)
    # layer -> the branches of it served here, in order: what a fan-out looks up.
    _by_layer: dict[int, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_layer: dict[int, list[int]] = {}
        for layer, branch in sorted(self.branches):
            by_layer.setdefault(layer, []).append(branch)
        self._by_layer = {layer: tuple(bs) for layer, bs in by_layer.items()}

    def layer_branches(self, layer: int) -> tuple[int, ...]:
        return self._by_layer.get(layer, ())

    def record_success(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self._median = None
        self.failures = 0
        self.benched_until = 0.0

    def record_failure(self, now: float, base_backoff_s: float) -> None:
        self.failures += 1
        # Capped low: a node that was only paused must come back within seconds, not minutes.
        self.benched_until = now + base_backoff_s * 2 ** min(self.failures - 1, 4)

    def usable(self, now: float) -> bool:
        return now >= self.benched_until

    def latency_estimate(self) -> float:
        """Median of recent calls (0 before any: a new node gets tried). Every fan-out sorts
        replicas by it, so it is computed once per recorded call, not per sort."""
        if self._median is None:
            ordered = sorted(self.latencies)
            self._median = ordered[len(ordered) // 2] if ordered else 0.0
        return self._median

    def p95(self, default_s: float) -> float:
        if len(self.latencies) < 5:
            return default_s
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


@dataclass(frozen=True)
class QuarantinePolicy:
    """When a node whose outputs keep being rejected stops getting traffic, and for how long.

    One strike is one rejected answer (a layer step's output for one branch), however many rows
    it held: a batch of bad rows is one offence. After the quarantine the node is back on
    probation: one strike then sends it back for twice as long.
    """

    strikes: int = 3  # strikes within window_s that quarantine a node; 0: never quarantine
    window_s: float = 60.0
    period_s: float = 30.0  # the first quarantine
    probation_s: float = 300.0  # after a quarantine, one strike within this sends it back
    max_period_s: float = 3600.0  # doubling stops here

    def __post_init__(self) -> None:
        if self.strikes < 0:
            raise ValueError(f"quarantine strikes must be >= 0, got {self.strikes}")
        times = (self.window_s, self.period_s, self.probation_s, self.max_period_s)
        if not all(math.isfinite(t) and t >= 0 for t in times):
            raise ValueError("quarantine times must be finite and >= 0")


@dataclass
class _Conduct:
    """One node's rejected answers and quarantines."""

    strikes: deque[float] = field(default_factory=deque)  # times of recent strikes
    until: float = 0.0  # quarantined before this
    probation_until: float = 0.0
    period_s: float = 0.0  # the last quarantine's length


class Registry:
    def __init__(self, backoff_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._nodes: dict[str, Node] = {}
        self._backoff_s = backoff_s
        self._clock = clock
        self._conduct: dict[str, _Conduct] = {}  # by node id, kept across re-admission

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

    def session_quota(self, default: int = 1 << 30) -> int:
        """The sessions this gateway may keep open at once: the smallest quota among the
        admitted nodes (a generation may touch every one of them)."""
        return min((n.session_quota for n in self._nodes.values()), default=default)

    def replicas(self, key: BranchKey) -> list[Node]:
        """Replicas of one branch to call, fastest first (never a quarantined one; benched
        ones only when no other is left)."""
        return self.layer_replicas(key[0], key[1] + 1).get(key[1], [])

    def layer_replicas(self, layer: int, branches: int) -> dict[int, list[Node]]:
        """:meth:`replicas` of branches ``0..branches-1`` of ``layer`` at once, in branch
        order (branches without a replica left out): one pass over the nodes for the whole
        fan-out, and no sort where a branch has one replica. Sorted by latency alone: a
        replica whose back-off ran out competes again on its speed (a failure count in the key
        would keep a once-paused node last forever). A branch whose every replica is benched
        still gets them, the one back soonest first: a benched replica may well answer (it
        only timed out while its machine was busy), a masked branch never does."""
        now = self._clock()
        found: dict[int, list[Node]] = {}
        benched: dict[int, list[Node]] = {}
        for node in self._nodes.values():
            served = node.layer_branches(layer)
            if not served or self._quarantined_at(node.node_id, now):
                continue
            into = found if node.usable(now) else benched
            for b in served:
                into.setdefault(b, []).append(node)
        out = {}
        for b in range(branches):
            nodes = found.get(b)
            if nodes:
                if len(nodes) > 1:
                    nodes.sort(key=Node.latency_estimate)  # stable: ties keep admission order
                out[b] = nodes
            elif nodes := benched.get(b):
                out[b] = sorted(nodes, key=lambda n: n.benched_until)
        return out

    def live_replicas(self, key: BranchKey) -> int:
        now = self._clock()
        return sum(1 for n in self._nodes.values() if key in n.branches and self._usable(n, now))

    def _usable(self, node: Node, now: float) -> bool:
        return node.usable(now) and not self._quarantined_at(node.node_id, now)

    def _quarantined_at(self, node_id: str, now: float) -> bool:
        conduct = self._conduct.get(node_id)
        return conduct is not None and now < conduct.until

    def strike(self, node_id: str, policy: QuarantinePolicy) -> float | None:
        """Count one rejected answer of ``node_id``; returns the quarantine's length in seconds
        when this strike put the node in quarantine, else None."""
        if policy.strikes == 0:
            return None
        now = self._clock()
        conduct = self._conduct.setdefault(node_id, _Conduct())
        if now < conduct.until:
            return None  # a late answer from before the quarantine: already counted
        conduct.strikes.append(now)
        while conduct.strikes[0] < now - policy.window_s:
            conduct.strikes.popleft()
        on_probation = now < conduct.probation_until
        if not on_probation and len(conduct.strikes) < policy.strikes:
            return None
        period = min(2 * conduct.period_s, policy.max_period_s) if on_probation else policy.period_s
        conduct.strikes.clear()
        conduct.period_s = period
        conduct.until = now + period
        conduct.probation_until = conduct.until + policy.probation_s
        return period

    def quarantined(self, node_id: str) -> bool:
        return self._quarantined_at(node_id, self._clock())

    def quarantined_count(self) -> int:
        """Admitted nodes in quarantine now (read by the metrics thread: copies, no iteration
        over a dict the event loop may change)."""
        return sum(self.quarantined(node_id) for node_id in list(self._nodes))

    def failed(self, node: Node) -> None:
        node.record_failure(self._clock(), self._backoff_s)
