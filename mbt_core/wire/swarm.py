"""The gateway's Status as plain data: what ``mbt status --json`` prints and the web view shows.

One shape for both, so that the table in a terminal and the page in a browser never disagree
about what a node or a branch is doing.
"""

from __future__ import annotations

from typing import Any

from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw

OUTCOME_NAMES = {gw.OUTCOME_OK: "ok", gw.OUTCOME_MASKED: "masked", gw.OUTCOME_REJECTED: "rejected"}


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
        "policy": status.policy,
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
    }
