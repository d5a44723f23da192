"""Prometheus metrics of a node (``mbt-node --metrics-port``), read from its session store.

The store tallies its refusals and evictions in a plain counter under its lock (nothing of
Prometheus on the request path); this collector turns them into series at scrape time. Every
known limit has a series from the start, so the first refusal raises ``increase()`` above 0.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class NodeCollector(Collector):
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


def node_registry(store: SessionStore) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(store))
    return registry
