"""Prometheus metrics of the gateway, on a registry the caller owns (never the global one).

Names follow ``mbt_<what>_<unit>``; labels stay low-cardinality (layer, branch, node, outcome,
reason), never a session id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mbt_aggregator.recent import RecentSteps
from mbt_aggregator.reports import MASKED, REJECTED

# What Membership counts besides admissions and rejections (each series exists from the start).
MEMBERSHIP_EVENTS = ("id_conflict", "goodbye_ignored", "displaced", "reinstated")
CALL_OUTCOMES = ("ok", "timeout", "error", "rejected")  # of one branch call (mbt_branch_calls)
# Why rows of a branch's output are refused (mbt_aggregator.defense, mbt_rejected_outputs).
OUTPUT_REJECTIONS = ("non_finite", "norm", "outvoted", "odd_one_out", "disagreement")
DISCOVERY_SOURCES = ("static", "mdns", "recheck")  # where membership learnt of a candidate
# Why a candidate node is refused (admission.py, identity.py, membership.py): each series
# exists from the start, so the first refusal raises increase() above 0.
REJECTION_REASONS = (
    "unreachable",
    "tls",
    "identity",
    "roster",
    "not_allowed",
    "protocol",
    "model",
    "manifest",
    "shape",
    "artifact",
    "conflict",
)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._branch_series: dict[tuple[int, int, str, str], tuple[Any, Any]] = {}
        self._layer_series: dict[int, tuple[Any, Any]] = {}
        r = registry
        self.branch_latency = Histogram(
            "mbt_branch_call_seconds",
            "Latency of successful branch calls",
            ["layer", "branch", "node"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.branch_calls = Counter(
            "mbt_branch_calls_total",
            "Branch calls by outcome (ok, timeout, error, rejected)",
            ["layer", "branch", "node", "outcome"],
            registry=r,
        )
        self.hedges = Counter(
            "mbt_hedged_calls_total",
            "Second-replica calls sent by hedging",
            ["layer", "branch"],
            registry=r,
        )
        self.replays = Counter(
            "mbt_cache_replays_total", "Replays of missed positions to a node", ["node"], registry=r
        )
        self.layer_latency = Histogram(
            "mbt_layer_step_seconds",
            "Fan-out + aggregation time of one layer step",
            ["layer"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_steps = Histogram(
            "mbt_batch_steps",
            "Session steps carried by one layer step (continuous batching)",
            ["layer"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.masked = Counter(
            "mbt_masked_branches_total",
            "Branches left out of a layer step",
            ["layer", "branch", "reason"],
            registry=r,
        )
        self.quorum_failures = Counter(
            "mbt_quorum_failures_total",
            "Layer steps that failed for lack of branches",
            ["layer"],
            registry=r,
        )
        self.clipped_outputs = Counter(
            "mbt_clipped_outputs_total",
            "Branch output rows (one position of one session) scaled down to the branch's "
            "calibrated norm bound",
            ["layer", "branch"],
            registry=r,
        )
        self.rejected_outputs = Counter(
            "mbt_rejected_outputs_total",
            "Branch output rows refused, by reason: non_finite (NaN/Inf), norm (beyond k x the "
            "bound), outvoted (far from the replica median), disagreement (two replicas differ)",
            ["layer", "branch", "reason"],
            registry=r,
        )
        self.replica_audits = Counter(
            "mbt_replica_audits_total",
            "Layer steps also sent to a second replica of a branch, to compare the two",
            ["layer", "branch"],
            registry=r,
        )
        self.replica_disagreements = Counter(
            "mbt_replica_disagreements_total",
            "Comparisons in which this node and another replica differed (counted for both: "
            "two replicas cannot tell which one is wrong)",
            ["node"],
            registry=r,
        )
        self.quarantines = Counter(
            "mbt_node_quarantines_total",
            "Nodes put in quarantine (no traffic) for repeatedly rejected outputs",
            registry=r,
        )
        self.quarantined_nodes = Gauge(
            "mbt_quarantined_nodes", "Admitted nodes in quarantine now", registry=r
        )
        self.requests_failed = Counter(
            "mbt_requests_failed_total", "Client requests that failed", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "mbt_time_to_first_token_seconds",
            "From request to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "mbt_token_seconds", "Time per generated token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("mbt_tokens_generated_total", "Tokens generated", registry=r)
        self.nodes_discovered = Counter(
            "mbt_nodes_discovered_total", "Candidate nodes found", ["source"], registry=r
        )
        for source in DISCOVERY_SOURCES:
            self.nodes_discovered.labels(source=source)
        self.nodes_admitted = Counter("mbt_nodes_admitted_total", "Nodes admitted", registry=r)
        self.nodes_rejected = Counter(
            "mbt_nodes_rejected_total", "Candidate nodes refused", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.nodes_rejected.labels(reason=reason)
        self.live_replicas = Gauge(
            "mbt_live_replicas", "Usable replicas per branch", ["layer", "branch"], registry=r
        )
        self.wire_bytes = Counter(
            "mbt_wire_bytes_total",
            "Bytes of layer inputs sent to nodes (one serialized Forward per node call) and of "
            "branch outputs received",
            ["direction"],
            registry=r,
        )
        self._sent = self.wire_bytes.labels(direction="sent")
        self._received = self.wire_bytes.labels(direction="received")
        self.membership_events = Counter(
            "mbt_membership_events_total",
            "id_conflict: a candidate claimed the id of a node healthy elsewhere (refused); "
            "goodbye_ignored: an mDNS goodbye of a node that still answers its health check; "
            "displaced: a node that stopped answering replaced under its id by another address; "
            "reinstated: such a node back at its address, the other one dropped",
            ["event"],
            registry=r,
        )
        for event in MEMBERSHIP_EVENTS:
            self.membership_events.labels(event=event)
        self.unended_sessions = Gauge(
            "mbt_unended_sessions",
            "Sessions whose end a node has not confirmed yet (retried in the background)",
            registry=r,
        )
        # Width used, lost weight, outcomes per branch: over recent steps (mbt_width_diagnostic,
        # mbt_lost_weight_total, mbt_lost_weight_ratio), and for the Status RPC.
        self.recent = RecentSteps()
        r.register(self.recent)

    def watch(self, quarantined: Callable[[], int], unended: Callable[[], int]) -> None:
        """The gauges read at each scrape: nodes in quarantine, sessions not ended yet."""
        self.quarantined_nodes.set_function(quarantined)
        self.unended_sessions.set_function(unended)

    def declare_layer(self, layer: int, alpha: Mapping[int, float]) -> None:
        """Every series of a layer and of its branches (``alpha``: branch -> weight), at 0:
        the first masked branch, quorum failure or refused output then raises ``increase()``
        above 0 (a series born with its first event starts at 1, and the alerts on it would
        miss that event). Called again as a layer's width grows or its weights change."""
        self.recent.declare(layer, alpha)
        labels = {"layer": str(layer)}
        self.quorum_failures.labels(**labels)
        self.layer_latency.labels(**labels)
        self.batch_steps.labels(**labels)
        for b in alpha:
            branch = {**labels, "branch": str(b)}
            for counter in (self.hedges, self.clipped_outputs, self.replica_audits):
                counter.labels(**branch)
            for reason in (MASKED, REJECTED):
                self.masked.labels(**branch, reason=reason)
            for reason in OUTPUT_REJECTIONS:
                self.rejected_outputs.labels(**branch, reason=reason)

    def admitted(self, node_id: str, branches: Iterable[tuple[int, int]]) -> None:
        """A node joins: its series exist from now on, at 0, so that its first failed call,
        replay or disagreement raises ``rate()`` (and the alerts on it can be evaluated
        before)."""
        self.nodes_admitted.inc()
        node = node_id[:16]
        self.replays.labels(node=node)
        self.replica_disagreements.labels(node=node)
        for layer, branch in branches:
            labels = {"layer": str(layer), "branch": str(branch), "node": node}
            self.branch_latency.labels(**labels)
            for outcome in CALL_OUTCOMES:
                self.branch_calls.labels(**labels, outcome=outcome)

    def branch_call(
        self, layer: int, branch: int, node_id: str, outcome: str, seconds: float | None = None
    ) -> None:
        """Count one branch call (and time a successful one). The labelled series are looked
        up once and kept: this runs for every call of every fan-out."""
        key = (layer, branch, node_id, outcome)
        series = self._branch_series.get(key)
        if series is None:
            labels = {"layer": str(layer), "branch": str(branch), "node": node_id[:16]}
            series = self._branch_series[key] = (
                self.branch_calls.labels(**labels, outcome=outcome),
                self.branch_latency.labels(**labels),
            )
        series[0].inc()
        if seconds is not None:
            series[1].observe(seconds)

    def wire(self, sent: int, received: Mapping[int, torch.Tensor], dtype: torch.dtype) -> None:
        """One node call's bytes: its request, and its outputs as they travelled."""
        self._sent.inc(sent)
        self._received.inc(sum(t.numel() for t in received.values()) * dtype.itemsize)

    def layer_step(self, layer: int, seconds: float, steps: int) -> None:
        """One layer step of ``steps`` batched session steps (series kept, as for calls)."""
        series = self._layer_series.get(layer)
        if series is None:
            labels = {"layer": str(layer)}
            series = self._layer_series[layer] = (
                self.layer_latency.labels(**labels),
                self.batch_steps.labels(**labels),
            )
        series[0].observe(seconds)
        series[1].observe(steps)
