"""Recent steps: width from the weights actually fused, over a sliding window; lost weight as a
counter and a histogram; each branch's recent outcomes."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.recent import RecentSteps
from mbt_aggregator.reports import MASKED, OK, REJECTED, BranchReport, LayerReport
from mbt_core.training.diagnostics import weight_stats

WEIGHTS = {0: 0.5, 1: 0.3, 2: 0.2}


def _report(*outcomes: str, layer: int = 0) -> LayerReport:
    branches = tuple(BranchReport(b, o, f"n{b}", False, 0.01) for b, o in enumerate(outcomes))
    lost = sum(WEIGHTS[b] for b, o in enumerate(outcomes) if o != OK)
    return LayerReport(layer, branches, 0.02, lost)


def _registry(recent: RecentSteps) -> CollectorRegistry:
    for layer in (0, 1):
        recent.declare(layer, WEIGHTS)
    registry = CollectorRegistry()
    registry.register(recent)
    return registry


def _width(registry: CollectorRegistry, name: str, layer: str = "0") -> float | None:
    return registry.get_sample_value("mbt_width_diagnostic", {"layer": layer, "name": name})


def test_width_follows_the_weights_used_over_the_window() -> None:
    recent = RecentSteps(window_steps=8)
    registry = _registry(recent)
    assert _width(registry, "effective_num_paths") is None  # no step yet: nothing claimed
    lost = {"layer": "0", "le": "0.0"}  # but the lost weight is there from the start, at 0
    assert registry.get_sample_value("mbt_lost_weight_ratio_bucket", lost) == 0
    full = weight_stats(torch.tensor(list(WEIGHTS.values())))["effective_num_paths"]
    recent.record(_report(OK, OK, OK), 8)
    assert _width(registry, "effective_num_paths") == pytest.approx(full)
    # Branch 0 lost for 4 steps: they fused 0.3 and 0.2, renormalized. The window keeps the
    # oldest record while dropping it would leave fewer than 8 steps: 12 steps now.
    recent.record(_report(MASKED, OK, OK), 4)
    two = math.exp(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert _width(registry, "effective_num_paths") == pytest.approx((2 * full + two) / 3)
    recent.record(_report(MASKED, OK, OK), 4)  # the healthy steps slid out
    assert _width(registry, "effective_num_paths") == pytest.approx(two)
    assert _width(registry, "top1_share") == pytest.approx(0.6)


def test_lost_weight_is_a_counter_and_a_histogram_per_session_step() -> None:
    recent = RecentSteps()
    registry = _registry(recent)
    recent.record(_report(OK, OK, OK), 5)
    recent.record(_report(OK, OK, REJECTED), 2)
    recent.record(_report(MASKED, OK, OK, layer=1), 1)
    value = registry.get_sample_value
    assert value("mbt_lost_weight_total", {"layer": "0"}) == pytest.approx(0.4)
    assert value("mbt_lost_weight_ratio_count", {"layer": "0"}) == 7
    assert value("mbt_lost_weight_ratio_sum", {"layer": "0"}) == pytest.approx(0.4)
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "0", "le": "0.0"}) == 5
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "0", "le": "0.1"}) == 5
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "0", "le": "0.25"}) == 7
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "0", "le": "+Inf"}) == 7
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "1", "le": "0.5"}) == 1
    assert value("mbt_lost_weight_ratio_bucket", {"layer": "1", "le": "0.25"}) == 0


def test_outcomes_per_branch_over_the_window() -> None:
    recent = RecentSteps(window_steps=4)
    _registry(recent)
    assert recent.outcomes() == {}
    recent.record(_report(OK, OK, OK), 3)
    recent.record(_report(OK, MASKED, REJECTED), 1)
    found = recent.outcomes()
    assert found[(0, 0)].counts == {OK: 4, MASKED: 0, REJECTED: 0}
    assert found[(0, 1)].counts == {OK: 3, MASKED: 1, REJECTED: 0}
    assert (found[(0, 1)].last, found[(0, 2)].last) == (MASKED, REJECTED)
    recent.record(_report(OK, OK, OK), 4)  # the window moved on
    assert recent.outcomes()[(0, 2)].counts == {OK: 4, MASKED: 0, REJECTED: 0}
