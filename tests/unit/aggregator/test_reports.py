"""Reports: what every branch did per session step, and the metrics counted in one place."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import Collected
from mbt_aggregator.registry import Node
from mbt_aggregator.reports import MASKED, OK, REJECTED, Answer, LayerReport, Reports
from mbt_core.errors import QuorumNotReached
from mbt_core.model.aggregate import aggregate

WEIGHTS = [0.5, 0.3, 0.2]
C = 4


def _node(node_id: str) -> Node:
    return Node(node_id, f"{node_id}:1", None, frozenset())  # type: ignore[arg-type]


def _collected(results: dict[int, Answer], hedged: set[int]) -> Collected[int, Answer]:
    return Collected(
        branches=tuple(range(len(WEIGHTS))),
        results=results,
        errors={},
        late={},
        hedged=hedged,
        answered_by_hedge=set(),
        elapsed_s=0.25,
        stopped_by="all",
        min_branches=1,
    )


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _run(
    reports: Reports, outputs: torch.Tensor, present: torch.Tensor, rows: list[int]
) -> tuple[list[LayerReport | BaseException], Collected[int, Answer]]:
    nodes = [_node(f"n{b}") for b in range(len(WEIGHTS))]
    results = {
        b: Answer(outputs[b], nodes[b], 0.01 * (b + 1))
        for b in range(len(WEIGHTS))
        if bool(present[b].any())
    }
    got = _collected(results, hedged={1})
    fused = aggregate(outputs, torch.tensor(WEIGHTS), present, norm_factor=None)
    out = reports.results(0, got, fused, None, rows, 0.5, dict(enumerate(WEIGHTS)))
    return [r if isinstance(r, BaseException) else r[1] for r in out], got


def test_a_masked_branch_is_reported_and_counted_once_per_step() -> None:
    metrics = Metrics(CollectorRegistry())
    reports = Reports(metrics, min_branches=1, weights=[dict(enumerate(WEIGHTS))])
    rows = [1, 1]
    outputs = torch.randn(len(WEIGHTS), sum(rows), C)
    present = torch.ones(len(WEIGHTS), sum(rows), dtype=torch.bool)
    present[2] = False  # branch 2 never answered
    made, _ = _run(reports, outputs, present, rows)
    assert all(isinstance(r, LayerReport) for r in made)
    report = made[0]
    assert isinstance(report, LayerReport)
    assert [b.outcome for b in report.branches] == [OK, OK, MASKED]
    assert report.lost_weight == pytest.approx(WEIGHTS[2])
    assert [b.node_id for b in report.branches] == ["n0", "n1", ""]
    assert [b.hedged for b in report.branches] == [False, True, False]
    assert report.branches[2].latency_s == 0.25  # the fan-out's time: it never answered
    masked = {"layer": "0", "branch": "2", "reason": MASKED}
    assert _sample(metrics, "mbt_masked_branches_total", **masked) == len(rows)
    assert _sample(metrics, "mbt_hedged_calls_total", layer="0", branch="1") == 1


def test_a_rejected_output_counts_as_a_rejected_call_of_its_node() -> None:
    metrics = Metrics(CollectorRegistry())
    reports = Reports(metrics, min_branches=1, weights=[dict(enumerate(WEIGHTS))])
    outputs = torch.randn(len(WEIGHTS), 1, C)
    outputs[0, 0, 0] = float("nan")  # the fusion rejects it
    present = torch.ones(len(WEIGHTS), 1, dtype=torch.bool)
    made, _ = _run(reports, outputs, present, [1])
    (report,) = made
    assert isinstance(report, LayerReport)
    assert [b.outcome for b in report.branches] == [REJECTED, OK, OK]
    labels = {"layer": "0", "branch": "0", "node": "n0", "outcome": "rejected"}
    assert _sample(metrics, "mbt_branch_calls_total", **labels) == 1


def test_steps_below_the_quorum_fail_alone() -> None:
    metrics = Metrics(CollectorRegistry())
    reports = Reports(metrics, min_branches=2, weights=[dict(enumerate(WEIGHTS))])
    rows = [1, 1]
    outputs = torch.randn(len(WEIGHTS), sum(rows), C)
    present = torch.ones(len(WEIGHTS), sum(rows), dtype=torch.bool)
    present[1:, 1] = False  # the second step has one branch only
    made, _ = _run(reports, outputs, present, rows)
    assert isinstance(made[0], LayerReport)
    assert isinstance(made[1], QuorumNotReached) and "1 branches usable" in str(made[1])
    assert _sample(metrics, "mbt_quorum_failures_total", layer="0") == 1
