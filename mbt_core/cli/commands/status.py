"""Show the swarm behind a gateway: its nodes, and every layer's branches with their replicas.

Asks the gateway's Status (with the credentials of mbt generate --gateway) and prints two
tables: the nodes (id, address, health, latency of recent calls, branches served), and per
layer every branch with its weight, live replicas, the nodes serving it and its recent
outcomes: the session steps of the gateway's recent window in which it was used, masked or
rejected, and the outcome of the last one ("-" before the layer's first step). --json prints
the same as one JSON object, the fan-out policy with each of its parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mbt_core.cli.flags import add_gateway_client_arguments, gateway_credentials
from mbt_core.wire.swarm import swarm

ID_WIDTH = 16  # node ids are key fingerprints: their start tells them apart


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gateway_client_arguments(p, help="the mbt-aggregator to ask (required)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--timeout-s", type=float, default=10.0, help="give up on the gateway after")


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render(data: dict[str, Any]) -> str:
    model = data["model"]
    digest = model["manifest_sha256"][:16]
    policy = data["policy"]["summary"]
    head = f"model {model['id']} v{model['version']} ({digest}), policy {policy}"
    grown = data.get("expansion") or {"state": "none"}
    if grown["state"] != "none":
        head += (
            f"\nexpansion v{grown['from_version']} -> v{grown['to_version']}: {grown['state']}, "
            f"beta {grown['beta']:.3f}"
        )
        if grown["drift_kl"] is not None:
            head += f", drift {grown['drift_kl']:.4f} nats/token"
        if grown["reason"]:
            head += f" ({grown['reason']})"
    nodes = [["NODE", "ADDRESS", "HEALTH", "LATENCY", "BRANCHES"]]
    for n in data["nodes"]:
        health = "up" if n["healthy"] else "down"
        latency = f"{n['latency_ms']:.1f} ms"
        nodes.append(
            [n["node_id"][:ID_WIDTH], n["address"], health, latency, ",".join(n["branches"])]
        )
    branches = [
        ["LAYER", "BRANCH", "WEIGHT", "REPLICAS", "NODES", "USED", "MASKED", "REJECTED", "LAST"]
    ]
    for layer in data["layers"]:
        for b in layer["branches"]:
            recent = b["recent"]
            branches.append(
                [
                    str(layer["layer"]),
                    str(b["branch"]),
                    f"{b['weight']:.3f}",
                    str(b["live_replicas"]),
                    ",".join(i[:ID_WIDTH] for i in b["nodes"]) or "-",
                    str(recent["ok"]),
                    str(recent["masked"]),
                    str(recent["rejected"]),
                    recent["last"],
                ]
            )
    return f"{head}\n\n{table(nodes)}\n\n{table(branches)}"


def run(args: argparse.Namespace) -> int:
    from mbt_core.wire.gateway_client import GatewayClient  # gRPC only for commands that call out

    if not args.gateway:
        raise ValueError("--gateway HOST:PORT is required")
    client = GatewayClient(args.gateway, gateway_credentials(args), args.timeout_s)
    data = swarm(client.status())
    print(json.dumps(data, indent=2) if args.json else render(data))
    sys.stdout.flush()
    return 0
