"""Membership: who answers at an address, and what may displace an admitted node.

Fake node clients stand in for the network (a real one is used only for an admission attempt
against a closed port on 127.0.0.1); admission itself is replaced where a test needs a
candidate that passes it, since the rules under test come after admission.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import mbt_aggregator.membership as membership_module
from mbt_aggregator.admission import Expectation, Rejected
from mbt_aggregator.membership import Membership
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.registry import Node, Registry
from mbt_core.errors import NodeUnavailable
from mbt_core.wire.contract import NodeInfo, NodeLimits

DIGEST = "d" * 64


class Answering:
    """A node client whose Describe reports ``node_id`` and ``digest`` while ``up``."""

    def __init__(self, node_id: str, digest: str = DIGEST, up: bool = True) -> None:
        self.node_id, self.digest, self.up = node_id, digest, up
        self.closed = False

    async def serving(self, timeout_s: float) -> bool:
        return self.up

    async def describe(self, timeout_s: float) -> NodeInfo:
        if not self.up:
            raise NodeUnavailable("x", "down")
        return NodeInfo(
            node_id=self.node_id,
            model_id="m",
            model_version=1,
            manifest_sha256=self.digest,
            branches=(),
            device="cpu",
            dtype=0,
            protocol_version=0,
            limits=NodeLimits(),
            d_model=8,
            context_length=0,
        )

    async def close(self) -> None:
        self.closed = True


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _membership() -> tuple[Membership, Registry, Metrics]:
    registry, metrics = Registry(), Metrics(CollectorRegistry())
    membership = Membership(registry, Expectation("m", 1, DIGEST, 8, {}), metrics, [], 0.5)
    return membership, registry, metrics


def _node(node_id: str, address: str, client: Answering) -> Node:
    return Node(node_id, address, client, frozenset({(0, 0)}))  # type: ignore[arg-type]


def _event(metrics: Metrics, event: str) -> float | None:
    return metrics.registry.get_sample_value("mbt_membership_events_total", {"event": event})


def test_the_admitted_node_answering_stays() -> None:
    membership, registry, metrics = _membership()
    client = Answering("admitted")
    node = _node("admitted", _closed_port(), client)
    registry.add(node)
    asyncio.run(membership._check(node))
    assert registry.get("admitted") is node and not client.closed
    recheck = {"source": "recheck"}  # the series exists from the start: nothing was rechecked
    assert metrics.registry.get_sample_value("mbt_nodes_discovered_total", recheck) == 0


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
    membership, registry, metrics = _membership()
    node = _node("admitted", _closed_port(), client)
    registry.add(node)
    asyncio.run(membership._check(node))
    assert registry.get("admitted") is None and client.closed
    sample = metrics.registry.get_sample_value
    assert sample("mbt_nodes_discovered_total", {"source": "recheck"}) == 1
    # The newcomer went through admission: nothing listens on that port, so it is refused.
    assert sample("mbt_nodes_rejected_total", {"reason": "unreachable"}) == 1
    assert registry.nodes == []


@pytest.fixture()
def admitting(monkeypatch: pytest.MonkeyPatch) -> dict[str, Answering]:
    """Admission that passes whoever answers: address -> the client answering there."""
    at: dict[str, Answering] = {}

    async def admit(address: str, *args: Any, **kw: Any) -> Node:
        client = at[address]
        if not client.up:
            raise Rejected(address, "unreachable", "down")
        return _node(client.node_id, address, client)

    monkeypatch.setattr(membership_module, "admit", admit)
    return at


def test_a_copied_id_never_evicts_a_node_healthy_where_it_is(
    admitting: dict[str, Answering],
) -> None:
    membership, registry, metrics = _membership()
    admitting["real:1"] = real = Answering("n1")
    admitting["rogue:2"] = Answering("n1")  # claims the same id, and says so in Describe

    async def main() -> None:
        await membership.offer("real:1", "mdns", "n1")
        await membership.offer("rogue:2", "mdns", "n1")

    asyncio.run(main())
    assert registry.get("n1").address == "real:1" and not real.closed  # type: ignore[union-attr]
    assert _event(metrics, "id_conflict") == 1
    sample = metrics.registry.get_sample_value
    assert sample("mbt_nodes_rejected_total", {"reason": "conflict"}) == 1


def test_a_displaced_node_comes_back_when_it_answers_again(
    admitting: dict[str, Answering],
) -> None:
    """The real node was away (paused) when a copy of its id appeared: the copy took its place,
    and is dropped again as soon as the real node answers at its own address."""
    membership, registry, metrics = _membership()
    admitting["real:1"] = real = Answering("n1")
    admitting["rogue:2"] = rogue = Answering("n1")

    async def main() -> None:
        await membership.offer("real:1", "mdns", "n1")
        real.up = False
        await membership.offer("rogue:2", "mdns", "n1")
        assert registry.get("n1").address == "rogue:2"  # type: ignore[union-attr]
        real.up = True
        await membership._try("real:1")  # what the watch loop does every interval

    asyncio.run(main())
    assert registry.get("n1").address == "real:1" and rogue.closed  # type: ignore[union-attr]
    assert _event(metrics, "displaced") == 1 and _event(metrics, "reinstated") == 1


def test_a_node_dropped_by_health_checks_is_reinstated_at_its_home(
    admitting: dict[str, Answering],
) -> None:
    """Paused long enough to fail its health checks, the real node left the registry; a copy
    of its id was then admitted like any newcomer. The real node's address stays its home: it
    is tried at every beat (no back-off) and, answering again, takes its id back."""
    membership, registry, metrics = _membership()
    admitting["real:1"] = real = Answering("n1")
    admitting["rogue:2"] = rogue = Answering("n1")

    async def main() -> None:
        await membership.offer("real:1", "mdns", "n1")
        real.up = False
        for _ in range(membership.max_failures):
            await membership._check(registry.get("n1"))  # type: ignore[arg-type]
        assert registry.get("n1") is None
        await membership._try("real:1")  # the watch loop, while it is still away
        watched = membership._watched["real:1"]
        assert watched.next_try - membership._now() <= membership.health_interval_s
        await membership.offer("rogue:2", "mdns", "n1")
        assert registry.get("n1").address == "rogue:2"  # type: ignore[union-attr]
        real.up = True
        await membership._try("real:1")

    asyncio.run(main())
    assert registry.get("n1").address == "real:1" and rogue.closed  # type: ignore[union-attr]
    assert _event(metrics, "reinstated") == 1 and _event(metrics, "displaced") == 0


def test_a_goodbye_is_believed_only_once_the_node_stops_answering(
    admitting: dict[str, Answering],
) -> None:
    membership, registry, metrics = _membership()
    admitting["n:1"] = node = Answering("n1")

    async def main() -> None:
        await membership.offer("n:1", "mdns", "n1")
        await membership.lost("n:1", "mDNS goodbye")  # forged: the node still answers
        assert registry.get("n1") is not None
        node.up = False
        await membership.lost("n:1", "mDNS goodbye")  # a real one

    asyncio.run(main())
    assert registry.get("n1") is None
    assert _event(metrics, "goodbye_ignored") == 1


def test_membership_counters_exist_at_zero() -> None:
    _, _, metrics = _membership()
    for event in ("id_conflict", "goodbye_ignored", "displaced", "reinstated"):
        assert _event(metrics, event) == 0


def test_a_dead_static_peer_backs_off_and_logs_at_most_once_a_minute(
    admitting: dict[str, Answering], caplog: pytest.LogCaptureFixture
) -> None:
    """The real watch loop with every interval scaled by 1/100 (the health beat 1 s -> 10 ms,
    the retry cap 30 s -> 0.3 s, the repeat of a log line 60 s -> 0.6 s): 3 simulated minutes
    of a static peer that is down, then its return. It once logged WARNING at every beat."""
    scale = 0.01
    admitting["dead:1"] = peer = Answering("n1", up=False)
    registry, metrics = Registry(), Metrics(CollectorRegistry())
    membership = Membership(
        registry,
        Expectation("m", 1, DIGEST, 8, {}),
        metrics,
        ["dead:1"],
        health_interval_s=1.0 * scale,
        retry_cap_s=30.0 * scale,
        repeat_log_s=60.0 * scale,
    )

    def tries() -> float:
        value = metrics.registry.get_sample_value(
            "mbt_nodes_rejected_total", {"reason": "unreachable"}
        )
        return value or 0.0

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    async def main() -> tuple[float, float]:
        await membership.start()
        await asyncio.sleep(60 * scale)
        first_minute = tries()
        assert 1 <= len(warnings()) <= 3, warnings()  # the bound: 3 lines a minute
        await asyncio.sleep(120 * scale)
        peer.up = True
        for _ in range(100):  # back within one retry cap (0.3 s)
            await asyncio.sleep(10 * scale)
            if registry.get("n1") is not None:
                break
        await membership.stop()
        return first_minute, tries()

    with caplog.at_level(logging.INFO, logger="mbt_aggregator"):
        first_minute, total = asyncio.run(main())
    down = warnings()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    # Down: one line at once, then at most one a minute, each with the count in between.
    assert 2 <= len(down) <= 4, down  # still down after 3 minutes: said again, with the count
    assert all("dead:1 rejected (unreachable)" in w for w in down)
    assert all("more tries failed alike" in w for w in down[1:]), down
    # Exponential back-off up to the cap: 0, 1, 3, 7, 15, 31 s... (not 60 tries a minute).
    assert 4 <= first_minute <= 8, first_minute
    assert total <= first_minute + 120 / 30 + 2, total
    # Back: once, at INFO.
    assert registry.get("n1") is not None
    assert [i for i in infos if "answers again" in i] == [infos[-2]] and "admitted" in infos[-1]
