"""Report statistics on hand-made records: percentiles, KL, time to mask/recover, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mbt_aggregator.outage.faults import Episode, Marker
from mbt_aggregator.outage.report import (
    kl_divergence,
    lost_fraction,
    percentile,
    summarize,
    table,
    table_row,
    time_to_mask,
    time_to_recover,
    write_json,
)
from mbt_aggregator.outage.workload import RequestRecord, RunRecord, ScoreRecord, TokenRecord


def _tok(t: float, nodes: set[str], lost: int = 0, latency: float = 0.01) -> TokenRecord:
    return TokenRecord(t, latency, 0, frozenset(nodes), 8, lost, lost / 8)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    rng = np.random.default_rng(q)
    values = list(rng.exponential(size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_by_hand_and_edge_cases() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0, 0.0], 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_kl_against_a_hand_made_distribution() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])
    q = np.array([[0.25, 0.25, 0.5], [0.9, 0.05, 0.05]])
    with np.errstate(divide="ignore"):
        got = kl_divergence(np.log(p), np.log(q))
    row0 = 0.5 * math.log(0.5 / 0.25) * 2  # the zero-probability entry adds nothing
    assert got == pytest.approx((row0 + 0.0) / 2)
    assert kl_divergence(np.log(q), np.log(q)) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_infinite_where_the_run_rules_out_a_likely_token_and_checks_shapes() -> None:
    p = np.log(np.array([[0.5, 0.5]]))
    with np.errstate(divide="ignore"):
        q = np.log(np.array([[1.0, 0.0]]))
    assert kl_divergence(p, q) == math.inf
    with pytest.raises(ValueError):
        kl_divergence(p, np.zeros((2, 2)))


def test_time_to_mask_and_recover() -> None:
    tokens = [
        _tok(0.5, {"a", "b"}),
        _tok(1.1, {"a", "b"}),  # in flight when the fault came: still used the node
        _tok(1.4, {"b"}),  # first without "a"
        _tok(2.0, {"b"}),
        _tok(3.2, {"a2", "b"}),  # the restarted node (a new id) is back
    ]
    assert time_to_mask(tokens, {"a"}, 1.0) == pytest.approx(0.4)
    assert time_to_recover(tokens, {"a", "a2"}, 2.5) == pytest.approx(0.7)
    assert time_to_recover(tokens, {"a"}, 2.5) is None
    assert time_to_mask(tokens, {"b"}, 0.0) is None


def test_lost_fraction_counts_tokens_while_scoring() -> None:
    tokens = [_tok(0.5, set(), lost=8), _tok(1.0, set(), lost=2), _tok(1.5, set(), lost=4)]
    assert lost_fraction(tokens, 0.9, 1.6, None) == pytest.approx(6 / 16)
    assert lost_fraction(tokens, 5.0, 6.0, 0.25) == 0.25


def _record() -> RunRecord:
    record = RunRecord(wall_s=2.0)
    record.tokens = [
        _tok(0.2, {"a", "b"}, latency=0.010),
        _tok(0.4, {"a", "b"}, latency=0.020),
        _tok(1.2, {"b"}, lost=4, latency=0.030),
        _tok(1.5, {"b"}, lost=4, latency=0.040),
    ]
    record.requests = [
        RequestRecord(0, 0, 0.0, [1, 2], ok=True),
        RequestRecord(1, 1, 0.0, [5, 9], ok=True),
        RequestRecord(0, 0, 1.0, [1], ok=False, error="UNAVAILABLE: gone"),
    ]
    logp = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    record.score = ScoreRecord(1.1, 1.6, 2.0, 2, 1, logp, "")
    return record


def test_summarize_a_run() -> None:
    reference = np.log(np.array([[0.5, 0.5], [0.75, 0.25]]))
    r = summarize(
        "crash",
        "all",
        _record(),
        [Episode(0, "kill", 1.0, 1.3)],
        [Marker(1.0, "fault", 0, "kill"), Marker(1.3, "recover", 0, "kill")],
        [{"a"}, {"b"}],
        reference,
        expected=[(1, 2), (5, 8)],
        max_new_tokens=4,
        branch_steps=8,
    )
    assert (r.requests_sent, r.requests_completed, r.tokens_lost) == (3, 2, 3)
    assert r.tokens == 4 and r.tokens_per_s == pytest.approx(2.0)
    assert r.latency_p50_ms == pytest.approx(25.0)
    assert r.greedy_match == pytest.approx(0.5)  # the second prompt's tokens differ
    assert r.perplexity == 2.0 and r.masked_fraction == pytest.approx(1 / 8)
    assert r.lost_fraction == pytest.approx(8 / 16)  # the two tokens while scoring
    assert r.kl == pytest.approx(0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)))
    assert r.time_to_mask_s == pytest.approx(0.2) and r.time_to_recover_s is None
    assert r.errors == {"UNAVAILABLE: gone": 1}
    assert r.lost_weight == pytest.approx(0.25)
    assert len(r.series) == 4 and r.markers[0]["kind"] == "fault"


def test_a_failed_score_leaves_quality_empty() -> None:
    record = _record()
    record.score = ScoreRecord(1.0, error="UNAVAILABLE: no quorum")
    r = summarize("x", "all", record, [], [], [], np.zeros((2, 2)), [(1, 2), (5, 9)], 4, 8)
    assert r.kl is None and r.perplexity is None and r.score_error.startswith("UNAVAILABLE")
    assert r.greedy_match == 1.0


def test_table_and_strict_json(tmp_path: Path) -> None:
    r = summarize(
        "crash", "deadline+hedge", _record(), [], [], [], np.zeros((2, 2)), [(1, 2), (5, 9)], 4, 8
    )
    text = table([table_row(r)])
    header, rule, row = text.splitlines()
    assert header.split()[:2] == ["scenario", "policy"] and set(rule) == {"-"}
    assert row.split()[:2] == ["crash", "deadline+hedge"] and "2/3" in row.split()
    path = tmp_path / "r.json"
    write_json(path, {"nan": float("nan"), "inf": [math.inf], "set": {"b", "a"}, "p": path})
    assert json.loads(path.read_text()) == {
        "nan": None,
        "inf": [None],
        "set": ["a", "b"],
        "p": str(path),
    }
