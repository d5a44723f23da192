"""Prometheus metrics of a node (``mbt-node --metrics-port``), on a registry of its own.

Batches and their compute time are observed once per batched forward of a branch (by its
batcher), refusals once per refused call (by the servicer, labelled by the domain error kind
and the gRPC code it becomes). The session store tallies its refusals and evictions in a plain
counter under its lock; :class:`StoreCollector` turns them into series at scrape time. Every
known limit, event and refusal kind has a series from the start, so that the first one raises
``increase()`` above 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mbt_core.errors import MbtError
from mbt_core.wire.contract import BranchKey
from mbt_node.sessions import SessionStore

LIMITS = (
    "max_sessions",
    "max_cached_tokens",
    "max_sessions_per_caller",
    "max_cached_tokens_per_caller",
)
# Session-level events besides refusals: steps or ends refused as another caller's, sessions
# dropped to make room for an authenticated caller, sessions expired for idleness.
EVENTS = ("not_owner", "evicted", "expired")
_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
Observe = Callable[[int, float], None]  # one batched forward: its session steps, its seconds


def kind_name(kind: type[MbtError]) -> str:
    """``NotSessionOwner`` -> ``not_session_owner``: a refusal's ``reason`` label."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind.__name__).lower()


class NodeMetrics:
    def __init__(self, refusals: Mapping[type[MbtError], grpc.StatusCode]) -> None:
        """``refusals``: every domain error a call may be refused with, and its gRPC code."""
        self.registry = r = CollectorRegistry()
        self.batch_steps = Histogram(
            "mbt_node_batch_steps",
            "Session steps in one batched forward of a branch (concurrent calls merged)",
            ["layer", "branch"],
            buckets=_STEPS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "mbt_node_compute_seconds",
            "Time of one batched forward of a branch (cache reservation included)",
            ["layer", "branch"],
            buckets=_SECONDS,
            registry=r,
        )
        self.refusals = Counter(
            "mbt_node_refused_calls",
            "Calls refused, by reason (the domain error kind) and the gRPC code it is sent as",
            ["reason", "code"],
            registry=r,
        )
        self._codes = dict(refusals)
        for kind, code in self._codes.items():
            self.refusals.labels(reason=kind_name(kind), code=code.name)

    def branch(self, key: BranchKey) -> Observe:
        """The observer of one branch's batches (its labelled series looked up once)."""
        labels = {"layer": str(key[0]), "branch": str(key[1])}
        steps, seconds = self.batch_steps.labels(**labels), self.compute_seconds.labels(**labels)

        def observe(batch_steps: int, compute_seconds: float) -> None:
            steps.observe(batch_steps)
            seconds.observe(compute_seconds)

        return observe

    def refused(self, kind: type[MbtError]) -> None:
        """One call refused with ``kind`` (a class of the table given at construction)."""
        self.refusals.labels(reason=kind_name(kind), code=self._codes[kind].name).inc()

    def watch(self, store: SessionStore) -> None:
        """Export the session store's counts and gauges from now on (once it is loaded)."""
        self.registry.register(StoreCollector(store))


class StoreCollector(Collector):
    def __init__(self, store: SessionStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        counts = dict(self._store.counts)  # a copy: the event loop may count meanwhile
        refused = CounterMetricFamily(
            "mbt_node_refusals",
            "Session steps refused for a full limit or quota (RESOURCE_EXHAUSTED), by limit",
            labels=["limit"],
        )
        for limit in LIMITS:
            refused.add_metric([limit], counts.get(f"refused:{limit}", 0))
        yield refused
        events = CounterMetricFamily(
            "mbt_node_session_events",
            "not_owner: steps or ends refused as another caller's session (PERMISSION_DENIED); "
            "evicted: anonymous sessions dropped for an authenticated caller; expired: idle",
            labels=["event"],
        )
        for event in EVENTS:
            events.add_metric([event], counts.get(event, 0))
        yield events
        yield GaugeMetricFamily(
            "mbt_node_sessions", "Sessions with a cache on this node", self._store.session_count
        )
        yield GaugeMetricFamily(
            "mbt_node_cached_tokens",
            "Positions reserved over all sessions and branches",
            self._store.cached_tokens(),
        )
