"""Per-branch defenses against Byzantine nodes: bounds, replica votes and audits, quarantine.

Fake nodes run the real branches in process (``tests.unit.aggregator.fakes.FakeClient``);
a bad one corrupts its answers as ``mbt-node --unsafe-test-fault`` does.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.defense import (
    AUDIT,
    MEDIAN,
    NON_FINITE,
    NORM,
    OFF,
    OUTVOTED,
    Defense,
    DefenseConfig,
)
from mbt_aggregator.engine import Engine
from mbt_aggregator.generation import generate_tokens
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, QuarantinePolicy, Registry
from mbt_aggregator.reports import OK, REJECTED
from mbt_aggregator.session import Session
from mbt_core.artifacts.calibration import branch_norm_bounds
from mbt_core.artifacts.manifest import NormBound
from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_node.faults import CorruptionFault
from tests.unit.aggregator.fakes import FakeClient, all_branches

BAD = (1, 1)  # the branch the Byzantine node serves in most tests


class ByzantineClient(FakeClient):
    """A fake node whose answers are corrupted after the real compute (caches stay right)."""

    def __init__(self, model: MBTLanguageModel, corrupt) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model)
        self.corrupt = corrupt

    async def send(self, payload, branches, timeout_s):  # type: ignore[no-untyped-def]
        out, seconds = await super().send(payload, branches, timeout_s)
        return {b: self.corrupt(x) for b, x in out.items()}, seconds


def _fault(mode: str):  # type: ignore[no-untyped-def]
    return CorruptionFault(mode).apply


@pytest.fixture()
def bounds(tiny_model: MBTLanguageModel) -> dict[tuple[int, int], NormBound]:
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (480,))
    return branch_norm_bounds(tiny_model, ids)


def _engine(
    model: MBTLanguageModel,
    layout: dict[str, list[tuple[int, int]]],
    defense: Defense,
    corrupt: dict | None = None,  # type: ignore[type-arg]
    clock=None,  # type: ignore[no-untyped-def]
) -> tuple[Engine, dict[str, FakeClient]]:
    registry = Registry(clock=clock) if clock else Registry()
    clients: dict[str, FakeClient] = {}
    for name, served in layout.items():
        bad = (corrupt or {}).get(name)
        clients[name] = ByzantineClient(model, bad) if bad else FakeClient(model)
        registry.add(Node(name, name, clients[name], frozenset(served)))  # type: ignore[arg-type]
    metrics = Metrics(CollectorRegistry())
    engine = Engine(model, registry, FanoutPolicy(), AggregationConfig(), metrics, None, defense)
    return engine, clients


def _healthy_but(model: MBTLanguageModel, key: tuple[int, int]) -> list[tuple[int, int]]:
    return [k for k in all_branches(model) if k != key]


def _reference(model: MBTLanguageModel, layer: int, h: torch.Tensor, mask=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.layers[layer](h[None], mask=mask).output[0]


def _hidden(model: MBTLanguageModel, layer: int, n: int) -> torch.Tensor:
    """A realistic input of ``layer`` at n positions (the bounds were calibrated on these)."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, n))
    with torch.no_grad():
        h = model.embed(ids, 0)
        for li in range(layer):
            h = model.layers[li](h).output
    return h[0]  # (n, C)


def _sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.fanout.metrics.registry.get_sample_value(name, labels) or 0.0


def _greedy(engine: Engine, model: MBTLanguageModel, n: int = 12) -> tuple[list[int], list[int]]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False)

    async def run() -> list[int]:
        return [e.token async for e in generate_tokens(engine, [3, 4, 5], cfg)]

    return asyncio.run(run()), [t for t, _ in generate(model, [3, 4, 5], cfg)]


def test_healthy_generation_with_bounds_is_bit_exact(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    engine, _ = _engine(
        tiny_model, {"a": all_branches(tiny_model)}, Defense(DefenseConfig(), bounds)
    )
    got, want = _greedy(engine, tiny_model)
    assert got == want
    assert engine.defense.norm_factor(1, 3, 8.0) is None  # every branch bounded
    assert _sample(engine, "mbt_clipped_outputs_total", layer="1", branch="1") == 0


@pytest.mark.parametrize(("mode", "reason"), [("nan", NON_FINITE), ("huge", NORM)])
def test_bounds_reject_nan_and_huge_outputs(tiny_model, bounds, mode, reason) -> None:  # type: ignore[no-untyped-def]
    layout = {"good": _healthy_but(tiny_model, BAD), "bad": [BAD]}
    engine, _ = _engine(tiny_model, layout, Defense(DefenseConfig(), bounds), {"bad": _fault(mode)})
    h = _hidden(tiny_model, 1, 4)
    out, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
    assert [b.outcome for b in report.branches] == [OK, REJECTED, OK]
    assert torch.equal(out, _reference(tiny_model, 1, h, torch.tensor([True, False, True])))
    assert _sample(engine, "mbt_rejected_outputs_total", layer="1", branch="1", reason=reason) == 4


def test_outputs_just_above_the_bound_are_clipped(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    bound = bounds[BAD].bound

    def inflate(x: torch.Tensor) -> torch.Tensor:  # every row to 2x the bound: clip, not reject
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 2 * bound

    layout = {"good": _healthy_but(tiny_model, BAD), "bad": [BAD]}
    engine, _ = _engine(tiny_model, layout, Defense(DefenseConfig(), bounds), {"bad": inflate})
    h = _hidden(tiny_model, 1, 3)
    _, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
    assert all(b.outcome == OK for b in report.branches)
    assert _sample(engine, "mbt_clipped_outputs_total", layer="1", branch="1") == 3
    with torch.no_grad():
        z = tiny_model.layers[1].branches[1](h[None])[0]  # the healthy output, rescaled
    clipped = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True) * bound
    screened = engine.defense.screen(BAD, [inflate(z)])
    assert torch.allclose(screened.output, clipped, rtol=1e-5)


def test_only_the_bad_rows_of_a_batch_are_refused(bounds) -> None:  # type: ignore[no-untyped-def]
    defense = Defense(DefenseConfig(), bounds)
    x = torch.randn(4, 32)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 0.1  # within every bound
    x[1, 3] = float("inf")
    screened = defense.screen(BAD, [x])
    assert screened.refused.tolist() == [False, True, False, False]
    assert torch.equal(screened.output[[0, 2, 3]], x[[0, 2, 3]])
    assert [(b.reason, b.rows) for b in screened.blame] == [(NON_FINITE, 1)]


def test_the_layer_check_passes_only_clean_answers(bounds) -> None:  # type: ignore[no-untyped-def]
    """``passing`` is the shortcut before ``screen``: it must never pass what screen would
    change. Branch 0 is healthy, 1 has a NaN, 2 a row above its bound, 3 has no bound here
    and an Inf (which passes only the size test); branch 4 has no bound and a huge row."""
    layer = BAD[0]
    partial = {k: v for k, v in bounds.items() if k[0] != layer or k[1] < 3}
    defense = Defense(DefenseConfig(), partial)
    x = torch.randn(5, 3, 32)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * 1e-3  # within every bound
    x[1, 0, 0] = float("nan")
    x[2, 2] *= 10 * partial[(layer, 2)].bound / 1e-3
    x[3, 1, 5] = float("inf")
    x[4, 0] *= 1e10
    assert defense.passing(layer, [0, 1, 2, 3, 4], x) == [True, False, False, False, True]
    assert defense.passing(layer, [4, 0], x) == [True, True]
    x[4, 1] *= 1e30  # finite, but its norm overflows: left to screen, which lets it pass
    assert defense.passing(layer, [4], x) == [False]
    for b, ok in enumerate(defense.passing(layer, list(range(5)), x)):
        screened = defense.screen((layer, b), [x[b]])
        clean = screened.clean and not bool(screened.refused.any())
        assert clean or not ok, b
        assert clean == (b in (0, 4)), b


def test_without_bounds_nan_is_still_refused_and_the_norm_factor_applies() -> None:
    defense = Defense(DefenseConfig(replica_check=OFF))
    x = torch.ones(2, 8)
    x[0, 0] = float("nan")
    assert defense.screen(BAD, [x]).refused.tolist() == [True, False]
    assert defense.norm_factor(1, 3, 8.0) == 8.0


@pytest.mark.parametrize("mode", ["nan", "huge", "flip", "random"])
def test_three_replica_median_outvotes_one_bad_replica(tiny_model, bounds, mode) -> None:  # type: ignore[no-untyped-def]
    # The bad replica is asked first: its answer is the one the others must overrule.
    layout = {
        "bad": all_branches(tiny_model),
        "r1": all_branches(tiny_model),
        "r2": all_branches(tiny_model),
    }
    defense = Defense(DefenseConfig(replica_check=MEDIAN), bounds)
    engine, clients = _engine(tiny_model, layout, defense, {"bad": _fault(mode)})
    h = _hidden(tiny_model, 1, 5)
    out, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
    assert all(b.outcome == OK for b in report.branches)
    assert report.branches[0].node_id == "bad"  # the primary, outvoted
    assert torch.equal(out, _reference(tiny_model, 1, h))  # exactly the healthy output
    assert all(c.calls == 1 for c in clients.values())  # one shared call per node
    reason = {"nan": NON_FINITE, "huge": NORM}.get(mode, OUTVOTED)
    got = _sample(engine, "mbt_rejected_outputs_total", layer="1", branch="0", reason=reason)
    assert got == 5


def test_median_of_healthy_replicas_is_bit_exact(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    layout = {name: all_branches(tiny_model) for name in ("r1", "r2", "r3")}
    engine, _ = _engine(tiny_model, layout, Defense(DefenseConfig(replica_check=MEDIAN), bounds))
    got, want = _greedy(engine, tiny_model)
    assert got == want


def test_the_bad_replica_is_quarantined_and_returns_on_probation(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    policy = QuarantinePolicy(strikes=2, window_s=10, period_s=5, probation_s=20)
    defense = Defense(DefenseConfig(replica_check=MEDIAN, quarantine=policy), bounds)
    layout = {
        "r1": all_branches(tiny_model),
        "r2": all_branches(tiny_model),
        "bad": all_branches(tiny_model),
    }
    engine, clients = _engine(
        tiny_model, layout, defense, {"bad": _fault("flip")}, clock=lambda: now[0]
    )

    async def steps(n: int) -> None:
        for _ in range(n):
            await engine.run_layer(Session(), 0, 0, _hidden(tiny_model, 0, 2))

    asyncio.run(steps(1))  # both branches of layer 0 outvoted: two strikes in one step
    assert engine.registry.quarantined("bad")
    assert _sample(engine, "mbt_node_quarantines_total") == 1
    assert _sample(engine, "mbt_quarantined_nodes") == 1
    calls = clients["bad"].calls
    asyncio.run(steps(2))
    assert clients["bad"].calls == calls  # no traffic in quarantine
    now[0] = 6.0  # released on probation: the next rejection sends it back for twice as long
    asyncio.run(steps(1))
    assert clients["bad"].calls == calls + 1
    assert engine.registry.quarantined("bad")
    now[0] = 6.0 + 9.0
    assert engine.registry.quarantined("bad")
    now[0] = 6.0 + 10.5
    assert not engine.registry.quarantined("bad")
    assert _sample(engine, "mbt_node_quarantines_total") == 2


def test_quarantine_policy_counts_strikes_within_the_window() -> None:
    now = [0.0]
    registry = Registry(clock=lambda: now[0])
    node = Node("n", "n", None, frozenset({(0, 0)}))  # type: ignore[arg-type]
    registry.add(node)
    policy = QuarantinePolicy(strikes=3, window_s=10, period_s=30, probation_s=60)
    assert registry.strike("n", policy) is None
    now[0] = 11.0  # the first strike left the window
    assert registry.strike("n", policy) is None
    assert registry.strike("n", policy) is None
    assert registry.strike("n", policy) == 30
    assert registry.replicas((0, 0)) == [] and registry.live_replicas((0, 0)) == 0
    registry.remove("n")
    registry.add(node)  # re-admission does not wash the record
    assert registry.quarantined("n") and registry.quarantined_count() == 1
    now[0] = 11.0 + 30 + 61  # probation passed cleanly: the next offence starts afresh
    assert registry.replicas((0, 0)) == [node]
    assert registry.strike("n", policy) is None
    assert registry.strike("n", QuarantinePolicy(strikes=0)) is None  # 0: never


def test_two_replica_audit_counts_a_disagreement_for_both(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    layout = {"good": all_branches(tiny_model), "bad": [BAD]}
    for slower in ("good", "bad"):  # whichever replica is asked first
        defense = Defense(DefenseConfig(replica_check=AUDIT, audit_rate=1.0), bounds)
        engine, _ = _engine(tiny_model, layout, defense, {"bad": _fault("flip")})
        engine.registry.get(slower).record_success(1.0)  # type: ignore[union-attr]
        h = _hidden(tiny_model, 1, 3)
        out, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
        assert [b.outcome for b in report.branches] == [OK, REJECTED, OK]
        assert report.branches[1].node_id != slower
        assert torch.equal(out, _reference(tiny_model, 1, h, torch.tensor([True, False, True])))
        assert _sample(engine, "mbt_replica_audits_total", layer="1", branch="1") == 1
        for node in ("good", "bad"):
            assert _sample(engine, "mbt_replica_disagreements_total", node=node) == 1
        assert not engine.registry.quarantined("good")  # a pair cannot say who is wrong


def test_an_audit_lets_the_bounds_decide_where_they_can(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    layout = {"good": all_branches(tiny_model), "bad": [BAD]}
    defense = Defense(DefenseConfig(replica_check=AUDIT, audit_rate=1.0), bounds)
    engine, _ = _engine(tiny_model, layout, defense, {"bad": _fault("nan")})
    h = _hidden(tiny_model, 1, 3)
    out, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
    assert all(b.outcome == OK for b in report.branches)  # the valid replica was used
    assert torch.equal(out, _reference(tiny_model, 1, h))
    got = _sample(engine, "mbt_rejected_outputs_total", layer="1", branch="1", reason=NON_FINITE)
    assert got == 3
    assert _sample(engine, "mbt_replica_disagreements_total", node="good") == 0


def test_an_audited_replica_behind_on_the_session_is_replayed(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    layout = {"a": all_branches(tiny_model), "b": all_branches(tiny_model)}
    defense = Defense(DefenseConfig(replica_check=AUDIT, audit_rate=0.3, audit_seed=3), bounds)
    engine, _ = _engine(tiny_model, layout, defense)
    got, want = _greedy(engine, tiny_model, 16)
    assert got == want
    audits = sum(
        _sample(engine, "mbt_replica_audits_total", layer=str(li), branch=str(b))
        for li, b in all_branches(tiny_model)
    )
    assert audits > 0
    assert sum(_sample(engine, "mbt_cache_replays_total", node=n) for n in "ab") > 0


def test_defense_config_is_validated() -> None:
    with pytest.raises(ValueError, match="replica check"):
        DefenseConfig(replica_check="vote")
    with pytest.raises(ValueError, match="audit_rate"):
        DefenseConfig(audit_rate=1.5)
    with pytest.raises(ValueError, match="reject_factor"):
        DefenseConfig(reject_factor=0.5)
    with pytest.raises(ValueError, match="strikes"):
        QuarantinePolicy(strikes=-1)


class SlowClient(FakeClient):
    """An honest fake node that answers ``delay_s`` late (its cache is filled at once)."""

    delay_s = 0.0

    async def send(self, payload, branches, timeout_s):  # type: ignore[no-untyped-def]
        out = await super().send(payload, branches, timeout_s)
        await asyncio.sleep(self.delay_s)
        return out


def test_a_hedge_is_checked_against_its_late_primary(tiny_model, bounds) -> None:  # type: ignore[no-untyped-def]
    """A slow honest primary is hedged to a replica that lies with a random direction of the
    right norm (it passes the bounds). That step uses the lie; the primary's late answer then
    shows the disagreement, and the branch is audited on its next ``alert_steps`` steps, where
    the lie is masked instead of fused."""
    model = tiny_model
    slow, liar = SlowClient(model), ByzantineClient(model, _fault("random"))
    registry = Registry()
    registry.add(Node("a", "a", FakeClient(model), frozenset(_healthy_but(model, BAD))))  # type: ignore[arg-type]
    registry.add(Node("slow", "slow", slow, frozenset({BAD})))  # type: ignore[arg-type]
    registry.add(Node("liar", "liar", liar, frozenset({BAD})))  # type: ignore[arg-type]
    for _ in range(8):  # the honest replica is the faster one on record: it is the primary
        registry.get("slow").record_success(0.001)  # type: ignore[union-attr]
        registry.get("liar").record_success(0.002)  # type: ignore[union-attr]
    defense = Defense(DefenseConfig(audit_rate=0.0, alert_steps=3), bounds)
    metrics = Metrics(CollectorRegistry())
    engine = Engine(
        model, registry, FanoutPolicy(hedge=True), AggregationConfig(), metrics, None, defense
    )
    h = _hidden(model, 1, 8)

    async def run() -> list:  # type: ignore[type-arg]
        session, reports = Session(), []
        slow.delay_s = 0.2  # past its p95: the step is hedged to the liar, who answers first
        reports.append((await engine.run_layer(session, 1, 0, h[:4]))[1])
        await asyncio.sleep(0.3)  # the primary's late answer arrives and is compared
        slow.delay_s = 0.0
        for t in range(4, 8):
            reports.append((await engine.run_layer(session, 1, t, h[t : t + 1]))[1])
        return reports

    first, *later = asyncio.run(run())
    hedged = first.branches[BAD[1]]
    assert hedged.hedged and hedged.node_id == "liar" and hedged.outcome == OK  # the lie was used
    for node in ("slow", "liar"):
        assert _sample(engine, "mbt_replica_disagreements_total", node=node) >= 1
    # On alert, every step asks both replicas: each disagreement masks the branch and renews
    # the alert (3 steps), so all 4 later steps are audited though the alert is shorter.
    assert [r.branches[BAD[1]].outcome for r in later] == [REJECTED] * 4
    assert _sample(engine, "mbt_replica_audits_total", layer="1", branch="1") == 5


def test_the_replica_that_disagrees_with_everyone_is_blamed_and_quarantined(
    tiny_model, bounds
) -> None:  # type: ignore[no-untyped-def]
    """A liar replicates two branches, each with a different honest node. Audits show two
    disagreeing pairs; the node common to both is blamed alone, quarantined after
    ``strikes``, and the branches are then served by the honest replicas only."""
    model = tiny_model
    pair_1, pair_2 = (1, 0), (1, 2)
    layout = {
        "a": _healthy_but(model, pair_2),  # honest, with the liar on (1, 0)
        "b": [pair_2],  # honest, with the liar on (1, 2)
        "liar": [pair_1, pair_2],
    }
    defense = Defense(DefenseConfig(audit_rate=1.0, audit_seed=0), bounds)
    engine, _ = _engine(model, layout, defense, corrupt={"liar": _fault("random")})
    h = _hidden(model, 1, 12)

    async def run() -> list:  # type: ignore[type-arg]
        session = Session()
        return [(await engine.run_layer(session, 1, t, h[t : t + 1]))[1] for t in range(12)]

    reports = asyncio.run(run())
    assert (
        _sample(engine, "mbt_rejected_outputs_total", layer="1", branch="0", reason="odd_one_out")
        + _sample(engine, "mbt_rejected_outputs_total", layer="1", branch="2", reason="odd_one_out")
        >= 3
    )
    assert engine.registry.quarantined("liar") and not engine.registry.quarantined("a")
    assert not engine.registry.quarantined("b")
    last = reports[-1]
    assert [b.outcome for b in last.branches] == [OK, OK, OK]
    assert "liar" not in {b.node_id for b in last.branches}
