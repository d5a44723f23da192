"""Replica choice: healthy and fast replicas first, benched ones back after their back-off."""

from __future__ import annotations

from mbt_aggregator.registry import Node, Registry


def test_replicas_prefer_healthy_and_fast_nodes() -> None:
    now = [0.0]
    registry = Registry(backoff_s=1.0, clock=lambda: now[0])
    slow, fast, broken = (Node(n, n, None, frozenset({(0, 0)})) for n in ("slow", "fast", "broken"))  # type: ignore[arg-type]
    for node in (slow, fast, broken):
        registry.add(node)
    for _ in range(5):
        slow.record_success(0.050)
        fast.record_success(0.005)
    for _ in range(5):
        broken.record_success(0.020)
    registry.failed(broken)
    assert [n.node_id for n in registry.replicas((0, 0))] == ["fast", "slow"]
    # The back-off passed: the node competes again on its speed (a paused node that came back
    # must not stay last forever); failing again doubles its back-off.
    now[0] = 1.5
    assert [n.node_id for n in registry.replicas((0, 0))] == ["fast", "broken", "slow"]
    registry.failed(broken)
    now[0] = 3.0
    assert "broken" not in [n.node_id for n in registry.replicas((0, 0))]
    assert registry.live_replicas((0, 0)) == 2
    now[0] = 3.6
    assert "broken" in [n.node_id for n in registry.replicas((0, 0))]
