"""The aggregator's layer step against in-process fake nodes (real branches, no network)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.client import CacheGap, NodeCallError, Payload
from mbt_aggregator.engine import MASKED, OK, Engine, _NodeCalls, _Step
from mbt_aggregator.generation import generate_tokens
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, Registry
from mbt_aggregator.session import LayerInputs, Session
from mbt_core.model.config import AggregationConfig
from mbt_core.model.kv import BranchCache
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.wire.codec import decode
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb


class FakeClient:
    """Runs real branches of ``model`` with a node's cache rules; can fail or forget."""

    def __init__(self, model: MBTLanguageModel) -> None:
        self.model = model
        self.caches: dict[tuple[str, int, int], BranchCache] = {}
        self.fail = False
        self.refuse: str | None = None  # a refusal of the request (FAILED_PRECONDITION)
        self.calls = 0
        self.steps_per_call: list[int] = []
        self.branches_per_call: list[tuple[int, ...]] = []
        self.address = "fake"

    async def send(self, payload: Payload, branches, timeout_s):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.fail:
            raise NodeCallError("fake", grpc.StatusCode.UNAVAILABLE, "down")
        if self.refuse is not None:
            raise NodeCallError("fake", grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        # What a node reads: the bytes a node would be sent, merged with its branches.
        request = pb.ForwardRequest.FromString(payload.request(branches, self.calls))
        layer, steps, inputs = request.layer, request.steps, decode(request.inputs)
        self.steps_per_call.append(len(steps))
        self.branches_per_call.append(tuple(request.branches))
        out = {}
        for b in branches:
            branch = self.model.layers[layer].branches[b]
            caches = [
                self.caches.setdefault((s.session_id, layer, b), branch.new_cache()) for s in steps
            ]
            for s, cache in zip(steps, caches, strict=True):  # all or nothing, as a node
                if s.start > cache.length:
                    raise CacheGap("fake", "gap", cache.length)
            for s, cache in zip(steps, caches, strict=True):
                cache.truncate(s.start)
            with torch.no_grad():
                out[b] = branch.forward_ragged(inputs, caches, [s.length for s in steps])
        return out, 0.0

    async def end_session(self, session_id: str, secret: bytes, timeout_s: float) -> int:
        gone = [k for k in self.caches if k[0] == session_id]
        for k in gone:
            del self.caches[k]
        return len(gone)

    async def close(self) -> None:
        pass


def _engine(
    model: MBTLanguageModel,
    layout: dict[str, list[tuple[int, int]]],
    policy: FanoutPolicy | None = None,
) -> tuple[Engine, dict[str, FakeClient]]:
    registry = Registry()
    clients = {}
    for name, served in layout.items():
        clients[name] = FakeClient(model)
        registry.add(Node(name, name, clients[name], frozenset(served)))  # type: ignore[arg-type]
    engine = Engine(
        model, registry, policy or FanoutPolicy(), AggregationConfig(), Metrics(CollectorRegistry())
    )
    return engine, clients


def _all(model: MBTLanguageModel) -> list[tuple[int, int]]:
    return [(li, b) for li, k in enumerate(model.cfg.branches) for b in range(k)]


def test_healthy_generation_equals_in_process(tiny_model: MBTLanguageModel) -> None:
    engine, _ = _engine(tiny_model, {"a": _all(tiny_model)})
    cfg = SamplingConfig(max_new_tokens=15, temperature=0, stop_at_eos=False)

    async def run() -> list[int]:
        return [e.token async for e in generate_tokens(engine, [3, 4, 5], cfg)]

    assert asyncio.run(run()) == [t for t, _ in generate(tiny_model, [3, 4, 5], cfg)]


def test_failed_node_is_masked_and_weights_renormalized(tiny_model: MBTLanguageModel) -> None:
    layout = {"a": [(0, 0), (1, 0), (1, 1)], "b": [(0, 1), (1, 2)]}
    engine, clients = _engine(tiny_model, layout)
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
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
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
    from mbt_core.errors import QuorumNotReached

    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)}, FanoutPolicy(min_branches=2))
    clients["a"].fail = True
    with pytest.raises(QuorumNotReached, match="layer 0"):
        asyncio.run(engine.run_layer(Session(), 0, 0, torch.randn(2, tiny_model.cfg.d_model)))


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


def test_a_failing_replica_fails_over_to_the_next(tiny_model: MBTLanguageModel) -> None:
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model), "b": _all(tiny_model)})
    h = torch.randn(3, tiny_model.cfg.d_model)
    first = engine.registry.replicas((0, 0))[0].node_id
    clients[first].fail = True
    out, report = asyncio.run(engine.run_layer(Session(), 0, 0, h))
    other = "b" if first == "a" else "a"
    assert all(b.outcome == OK and b.node_id == other for b in report.branches)
    with torch.no_grad():
        assert torch.equal(out, tiny_model.layers[0](h[None]).output[0])


def test_concurrent_sessions_share_one_call_per_node(tiny_model: MBTLanguageModel) -> None:
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
    hs = [torch.randn(n, tiny_model.cfg.d_model) for n in (3, 5, 2)]

    async def run() -> list[torch.Tensor]:
        results = await asyncio.gather(*(engine.run_layer(Session(), 1, 0, h) for h in hs))
        return [out for out, _ in results]

    outs = asyncio.run(run())
    # One call to the node for all its branches of the layer, carrying the three sessions.
    assert clients["a"].steps_per_call == [3]
    assert clients["a"].branches_per_call == [tuple(range(len(tiny_model.layers[1].branches)))]
    for h, out in zip(hs, outs, strict=True):
        with torch.no_grad():
            ref = tiny_model.layers[1](h[None]).output[0]
        assert (out - ref).abs().max().item() < 1e-5


def test_a_gap_in_a_batched_call_is_replayed_per_session(tiny_model: MBTLanguageModel) -> None:
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
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
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
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


def test_layer_inputs_keep_every_position_for_replays() -> None:
    """Recorded steps read back exactly; a step from an earlier position (a rollback)
    replaces what followed it; growing past the first buffer keeps everything."""
    inputs = LayerInputs()
    h = torch.randn(40, 8)
    inputs.record(0, h[:5])
    for t in range(5, 30):  # one position per step, past the first buffer of 16
        inputs.record(t, h[t : t + 1])
    assert inputs.length == 30 and torch.equal(inputs[0:30], h[:30])
    redo = torch.randn(3, 8)
    inputs.record(10, redo)  # a rollback to 10: 13 positions kept
    assert inputs.length == 13
    assert torch.equal(inputs[:], torch.cat([h[:10], redo]))
    assert torch.equal(inputs[8:12], torch.cat([h[8:10], redo[:2]]))
    with pytest.raises(ValueError, match="start at 14"):
        inputs.record(14, redo)  # a hole: nothing to replay it from


def test_a_step_that_cannot_go_on_fails_alone(tiny_model: MBTLanguageModel) -> None:
    """A step whose next layer cannot take it (its kept inputs there have a hole) fails with
    that error; the layer workers live on and serve the next steps."""
    engine, _ = _engine(tiny_model, {"a": _all(tiny_model)})
    h = torch.randn(6, tiny_model.cfg.d_model)

    async def run() -> None:
        session = Session()
        await engine.run_layer(session, 0, 0, h[:5])  # layer 0 keeps 5 positions, layer 1 none
        with pytest.raises(ValueError, match="inputs start at 5, but 0 positions are kept"):
            await asyncio.wait_for(engine._run(session, 5, h[5:], 0, 1, head=False), 5)
        out, report = await asyncio.wait_for(engine.run_layer(Session(), 1, 0, h), 5)
        assert out.shape == h.shape and report.layer == 1
        logits, reports = await asyncio.wait_for(engine.run_token(Session(), [3, 4], 0), 5)
        assert logits.shape == (2, tiny_model.cfg.vocab_size) and len(reports) == 2

    asyncio.run(run())


def test_a_call_that_outlives_its_step_sends_the_inputs_of_its_layer(
    tiny_model: MBTLanguageModel,
) -> None:
    """A hedge's loser or an audit may reach a node after the step it belongs to has moved on
    to the next layer's inputs; when one session of its batch needs a replay, the others are
    sent again one by one, and must still carry their own layer's inputs (a churn soak once
    saw replicas disagree from such calls, and mask the branch)."""
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
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
    steps = [_Step(sessions[n], 5, h[n][5:], 0, 1, False, loop.create_future()) for n in sessions]
    for name, session in sessions.items():
        session.history[0].record(5, h[name][5:])  # as the layer's worker does
    calls = _NodeCalls(engine, steps, 0, {0: [node]})
    for step in steps:
        step.h = torch.randn(1, d)  # the steps moved on to layer 1
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
    rest = [k for k in _all(tiny_model) if k != (0, 0)]
    engine, clients = _engine(tiny_model, {"a": [(0, 0)], "b": rest})
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
    engine, clients = _engine(tiny_model, {"a": _all(tiny_model)})
    node = engine.registry.get("a")
    assert node is not None
    session = Session()
    h = torch.randn(3, tiny_model.cfg.d_model)

    async def run() -> None:
        await engine.run_layer(session, 0, 0, h[:2])
        await engine.end_session(session)
        assert not clients["a"].caches  # ended on the node
        step = _Step(session, 2, h[2:], 0, 1, False, asyncio.get_running_loop().create_future())
        with pytest.raises(NodeCallError, match="ended"):
            await _NodeCalls(engine, [step], 0, {0: [node]}).answer(node, 0)

    asyncio.run(run())
    assert clients["a"].calls == 1 and not clients["a"].caches
    assert node.usable(time.monotonic())
