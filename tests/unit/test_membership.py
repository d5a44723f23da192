"""Health checks re-verify who answers at an admitted node's address (fake clients, and one
real admission attempt against a closed port on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry

from mbt_aggregator.admission import Expectation
from mbt_aggregator.membership import Membership
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.registry import Node, Registry
from mbt_core.protocol.mbt.v1 import branch_pb2 as pb

DIGEST = "d" * 64


class Answering:
    """A node client whose Describe reports ``node_id`` and ``digest``."""

    def __init__(self, node_id: str, digest: str = DIGEST) -> None:
        self.node_id, self.digest = node_id, digest
        self.closed = False

    async def describe(self, timeout_s: float) -> pb.DescribeResponse:
        return pb.DescribeResponse(node_id=self.node_id, manifest_sha256=self.digest)

    async def close(self) -> None:
        self.closed = True


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _check(client: Answering) -> tuple[Registry, Metrics]:
    registry, metrics = Registry(), Metrics(CollectorRegistry())
    membership = Membership(registry, Expectation("m", 1, DIGEST, 8, {}), metrics, [], 0.5)
    registry.add(Node("admitted", _closed_port(), client, frozenset({(0, 0)})))  # type: ignore[arg-type]
    asyncio.run(membership._check("admitted"))
    return registry, metrics


def test_the_admitted_node_answering_stays() -> None:
    client = Answering("admitted")
    registry, metrics = _check(client)
    assert registry.get("admitted") is not None and not client.closed
    assert (
        metrics.registry.get_sample_value("mbt_nodes_discovered_total", {"source": "recheck"})
        is None
    )


@pytest.mark.parametrize(
    "client",
    [Answering("restarted"), Answering("admitted", digest="e" * 64)],
    ids=["another node id", "another manifest"],
)
def test_another_node_at_the_address_replaces_the_admitted_one_only_through_admission(
    client: Answering,
) -> None:
    """A restart on the same port with a new identity (or new artifacts) once kept its
    predecessor's admission: health checks only asked whether something answered."""
    registry, metrics = _check(client)
    assert registry.get("admitted") is None and client.closed
    sample = metrics.registry.get_sample_value
    assert sample("mbt_nodes_discovered_total", {"source": "recheck"}) == 1
    # The newcomer went through admission: nothing listens on that port, so it is refused.
    assert sample("mbt_nodes_rejected_total", {"reason": "unreachable"}) == 1
    assert registry.nodes == []
