"""The gateway's Status as plain data: what ``mbt status --json`` prints and the web view shows.

One shape for both, so that the table in a terminal and the page in a browser never disagree
about what a node or a branch is doing.
"""

from __future__ import annotations

from typing import Any

from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw

OUTCOME_NAMES = {gw.OUTCOME_OK: "ok", gw.OUTCOME_MASKED: "masked", gw.OUTCOME_REJECTED: "rejected"}


def policy(status: gw.StatusResponse) -> dict[str, Any]:
    """The fan-out policy, field by field with its one-line ``summary``; a gateway older than
    ``fanout_policy`` gives the summary alone (its repr of the policy)."""
    summary = {"summary": status.policy}
    if not status.HasField("fanout_policy"):
        return summary
    p = status.fanout_policy
    return {
        "mode": p.mode,
        "request_timeout_s": p.request_timeout_s,
        "quorum_branches": p.quorum_branches if p.HasField("quorum_branches") else None,
        "quorum_weight": p.quorum_weight if p.HasField("quorum_weight") else None,
        "grace_ms": p.grace_ms,
        "deadline_ms": p.deadline_ms,
        "min_branches": p.min_branches,
        "hedge": p.hedge,
        **summary,
    }


def swarm(status: gw.StatusResponse) -> dict[str, Any]:
    """The Status reply as plain data: nodes, then layers of branches with their replicas."""
    serving: dict[str, list[str]] = {}
    for n in status.nodes:
        for key in n.branches:
            serving.setdefault(key, []).append(n.node_id)
    layers: dict[int, list[dict[str, Any]]] = {}
    for b in status.branches:
        layers.setdefault(b.layer, []).append(
            {
                "branch": b.branch,
                "weight": round(b.weight, 4),
                "live_replicas": b.live_replicas,
                "nodes": serving.get(f"{b.layer}:{b.branch}", []),
                "recent": {
                    "ok": b.recent_ok,
                    "masked": b.recent_masked,
                    "rejected": b.recent_rejected,
                    "last": OUTCOME_NAMES.get(b.last_outcome, "-"),
                },
            }
        )
    return {
        "model": {
            "id": status.model_id,
            "version": status.model_version,
            "manifest_sha256": status.manifest_sha256,
        },
        "policy": policy(status),
        "nodes": [
            {
                "node_id": n.node_id,
                "address": n.address,
                "healthy": n.healthy,
                "latency_ms": round(n.latency_ms, 3),
                "branches": list(n.branches),
            }
            for n in status.nodes
        ],
        "layers": [{"layer": i, "branches": layers[i]} for i in sorted(layers)],
        "expansion": expansion(status.expansion),
    }


def expansion(e: gw.ExpansionStatus) -> dict[str, Any]:
    """The last live expansion; measurements not taken yet are None."""

    def measured(name: str) -> float | None:
        return round(getattr(e, name), 6) if e.HasField(name) else None

    return {
        "state": e.state or "none",
        "from_version": e.from_version,
        "to_version": e.to_version,
        "beta": round(e.beta, 6),
        "target": e.target,
        "drift_kl": measured("drift_kl"),
        "probe_perplexity": measured("probe_perplexity"),
        "base_perplexity": measured("base_perplexity"),
        "reason": e.reason,
        "new_branches": list(e.new_branches),
    }
