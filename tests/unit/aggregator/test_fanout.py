"""The fan-out against in-process fake nodes: masks, failover, replays, refusals, quorum."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from mbt_aggregator.fanout import LayerCalls, Part
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.reports import MASKED, OK
from mbt_aggregator.session import LayerInputs, Session
from mbt_core.errors import QuorumNotReached, SessionGone
from mbt_core.model.lm import MBTLanguageModel
from tests.unit.aggregator.fakes import all_branches, make_engine


def test_failed_node_is_masked_and_weights_renormalized(tiny_model: MBTLanguageModel) -> None:
    layout = {"a": [(0, 0), (1, 0), (1, 1)], "b": [(0, 1), (1, 2)]}
    engine, clients = make_engine(tiny_model, layout)
    clients["b"].fail = True
    h = torch.randn(4, tiny_model.cfg.d_model)
    out, report = asyncio.run(engine.run_layer(Session(), 1, 0, h))
    assert [b.outcome for b in report.branches] == [OK, OK, MASKED]
    with torch.no_grad():
        ref = tiny_model.layers[1](h[None], mask=torch.tensor([True, True, False])).output[0]
    assert torch.equal(out, ref)
    alpha = tiny_model.layers[1].weights().detach()
    assert report.lost_weight == pytest.approx(float(alpha[2]))
    node = engine.registry.get("b")
    assert node is not None and not node.usable(time.monotonic())  # benched after the failure
    # ... but still called while no other replica is left: it may answer, a mask never does
    assert engine.registry.replicas((1, 2)) == [node]


def test_a_node_that_lost_its_cache_is_replayed(tiny_model: MBTLanguageModel) -> None:
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    h = torch.randn(10, tiny_model.cfg.d_model)
    session = Session()

    async def run() -> torch.Tensor:
        await engine.run_layer(session, 0, 0, h[:6])
        clients["a"].caches.clear()  # the node restarted
        out, report = await engine.run_layer(session, 0, 6, h[6:])
        assert all(b.outcome == OK for b in report.branches)
        return out

    out = asyncio.run(run())
    with torch.no_grad():
        ref = tiny_model.layers[0](h[None]).output[0, 6:]
    assert (out - ref).abs().max().item() < 1e-6
    assert all(c.length == 10 for c in clients["a"].caches.values())


def test_too_few_branches_is_quorum_not_reached(tiny_model: MBTLanguageModel) -> None:
    engine, clients = make_engine(
        tiny_model, {"a": all_branches(tiny_model)}, FanoutPolicy(min_branches=2)
    )
    clients["a"].fail = True
    with pytest.raises(QuorumNotReached, match="layer 0"):
        asyncio.run(engine.run_layer(Session(), 0, 0, torch.randn(2, tiny_model.cfg.d_model)))


def test_a_failing_replica_fails_over_to_the_next(tiny_model: MBTLanguageModel) -> None:
    engine, clients = make_engine(
        tiny_model, {"a": all_branches(tiny_model), "b": all_branches(tiny_model)}
    )
    h = torch.randn(3, tiny_model.cfg.d_model)
    first = engine.registry.replicas((0, 0))[0].node_id
    clients[first].fail = True
    out, report = asyncio.run(engine.run_layer(Session(), 0, 0, h))
    other = "b" if first == "a" else "a"
    assert all(b.outcome == OK and b.node_id == other for b in report.branches)
    with torch.no_grad():
        assert torch.equal(out, tiny_model.layers[0](h[None]).output[0])


def test_a_gap_in_a_batched_call_is_replayed_per_session(tiny_model: MBTLanguageModel) -> None:
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    d = tiny_model.cfg.d_model
    s1, s2 = Session(), Session()
    h1, h2 = torch.randn(6, d), torch.randn(6, d)

    async def run() -> list[torch.Tensor]:
        await asyncio.gather(engine.run_layer(s1, 0, 0, h1[:4]), engine.run_layer(s2, 0, 0, h2[:4]))
        for key in [k for k in clients["a"].caches if k[0] == s2.session_id]:
            del clients["a"].caches[key]  # the node lost one session's caches
        results = await asyncio.gather(
            engine.run_layer(s1, 0, 4, h1[4:]), engine.run_layer(s2, 0, 4, h2[4:])
        )
        return [out for out, _ in results]

    outs = asyncio.run(run())
    for h, out in zip((h1, h2), outs, strict=True):
        with torch.no_grad():
            ref = tiny_model.layers[0](h[None]).output[0, 4:]
        assert (out - ref).abs().max().item() < 1e-5


def test_branches_of_one_node_with_different_gaps_are_replayed(
    tiny_model: MBTLanguageModel,
) -> None:
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    d = tiny_model.cfg.d_model
    session, h = Session(), torch.randn(7, d)

    async def run() -> torch.Tensor:
        await engine.run_layer(session, 0, 0, h[:6])
        clients["a"].caches[(session.session_id, 0, 0)].truncate(4)  # lost two positions
        clients["a"].caches[(session.session_id, 0, 1)].truncate(1)  # lost five
        before = clients["a"].calls
        out, report = await engine.run_layer(session, 0, 6, h[6:])
        # Refused (gap at 4), replay from 4 refused (branch 1 holds 1), replay from 1.
        assert clients["a"].calls - before == 3
        assert all(b.outcome == OK for b in report.branches)
        return out

    out = asyncio.run(run())
    with torch.no_grad():
        ref = tiny_model.layers[0](h[None]).output[0, 6:]
    assert (out - ref).abs().max().item() < 1e-5


def test_a_call_that_outlives_its_step_sends_the_inputs_of_its_layer(
    tiny_model: MBTLanguageModel,
) -> None:
    """A hedge's loser or an audit may reach a node after the step it belongs to has moved on
    to the next layer's inputs; when one session of its batch needs a replay, the others are
    sent again one by one, and must still carry their own layer's inputs (a churn soak once
    saw replicas disagree from such calls, and mask the branch)."""
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    node = engine.registry.get("a")
    assert node is not None
    d = tiny_model.cfg.d_model
    h = {name: torch.randn(6, d) for name in ("kept", "lost")}
    sessions = {name: Session() for name in h}
    for name, session in sessions.items():
        asyncio.run(engine.run_layer(session, 0, 0, h[name][:5]))
    for key in [k for k in clients["a"].caches if k[0] == sessions["lost"].session_id]:
        del clients["a"].caches[key]  # this one needs a replay, the other does not
    loop = asyncio.new_event_loop()
    parts = [Part(sessions[n], 5, h[n][5:]) for n in sessions]  # what the layer step sends
    for name, session in sessions.items():
        session.history[0].record(5, h[name][5:])  # as the layer's worker does
    calls = LayerCalls(engine.fanout.node_calls, parts, 0, {0: [node]})
    for session in sessions.values():  # the steps moved on: layer 1's inputs are kept too
        session.history.setdefault(1, LayerInputs()).record(0, torch.randn(6, d))
    try:
        answer = loop.run_until_complete(calls.answer(node, 0))
    finally:
        loop.close()
    with torch.no_grad():
        branch = tiny_model.layers[0].branches[0]
        ref = torch.cat([branch(h[n][None])[0, 5:] for n in sessions])
    assert torch.allclose(answer.outputs, ref, atol=1e-5)


def test_a_refused_request_does_not_bench_the_node(tiny_model: MBTLanguageModel) -> None:
    """A late call whose session has ended is refused: the node is fine, and stays usable
    (benching it left its branch one fault away from a mask)."""
    rest = [k for k in all_branches(tiny_model) if k != (0, 0)]
    engine, clients = make_engine(tiny_model, {"a": [(0, 0)], "b": rest})
    clients["a"].refuse = "step 0: the session was ended; open a new one"
    h = torch.randn(2, tiny_model.cfg.d_model)
    _, report = asyncio.run(engine.run_layer(Session(), 0, 0, h))
    assert [b.outcome for b in report.branches] == [MASKED, OK]
    node = engine.registry.get("a")
    assert node is not None and node.usable(time.monotonic())
    clients["a"].refuse, clients["a"].fail = None, True
    asyncio.run(engine.run_layer(Session(), 0, 0, h))
    assert not node.usable(time.monotonic())  # a node that is down is benched


def test_a_late_call_after_its_generation_ended_sends_nothing(
    tiny_model: MBTLanguageModel,
) -> None:
    """A primary that fails over (or a replay) after the generation ended would open the
    session again on a node the end has passed already: a churn soak found such sessions left
    on nodes. It is refused before it is sent, and the node is not benched for it."""
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    node = engine.registry.get("a")
    assert node is not None
    session = Session()
    h = torch.randn(3, tiny_model.cfg.d_model)

    async def run() -> None:
        await engine.run_layer(session, 0, 0, h[:2])
        await engine.end_session(session)
        assert not clients["a"].caches  # ended on the node
        calls = LayerCalls(engine.fanout.node_calls, [Part(session, 2, h[2:])], 0, {0: [node]})
        with pytest.raises(SessionGone, match="ended"):
            await calls.answer(node, 0)

    asyncio.run(run())
    assert clients["a"].calls == 1 and not clients["a"].caches
    assert node.usable(time.monotonic())
