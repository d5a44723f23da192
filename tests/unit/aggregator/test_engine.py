"""The layer scheduler against in-process fake nodes: batching, hand-on, the head, status."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mbt_aggregator.generation import generate_tokens
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.session import Session
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from tests.unit.aggregator.fakes import all_branches, make_engine


def test_healthy_generation_equals_in_process(tiny_model: MBTLanguageModel) -> None:
    engine, _ = make_engine(tiny_model, {"a": all_branches(tiny_model)})
    cfg = SamplingConfig(max_new_tokens=15, temperature=0, stop_at_eos=False)

    async def run() -> list[int]:
        return [e.token async for e in generate_tokens(engine, [3, 4, 5], cfg)]

    assert asyncio.run(run()) == [t for t, _ in generate(tiny_model, [3, 4, 5], cfg)]


def test_concurrent_sessions_share_one_call_per_node(tiny_model: MBTLanguageModel) -> None:
    engine, clients = make_engine(tiny_model, {"a": all_branches(tiny_model)})
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


def test_a_step_that_cannot_go_on_fails_alone(tiny_model: MBTLanguageModel) -> None:
    """A step whose next layer cannot take it (its kept inputs there have a hole) fails with
    that error; the layer workers live on and serve the next steps."""
    engine, _ = make_engine(tiny_model, {"a": all_branches(tiny_model)})
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


def test_status_reports_nodes_replicas_and_weights(tiny_model: MBTLanguageModel) -> None:
    """What the Status RPC shows comes from ``engine.status()``: a benched node is not healthy,
    a branch it shares with one other node has one live replica (two healthy nodes: two), and
    the weights are the trunk's alpha."""
    rest = [k for k in all_branches(tiny_model) if k != (0, 0)]
    layout = {"a": all_branches(tiny_model), "b": [(0, 0)], "c": rest}
    policy = FanoutPolicy(mode="deadline", deadline_ms=50)
    engine, _ = make_engine(tiny_model, layout, policy)
    down = engine.registry.get("b")
    assert down is not None
    engine.registry.failed(down)  # as a failed call benches it
    status = engine.status()
    by_id = {n.node_id: n for n in status.nodes}
    assert by_id["a"].healthy and by_id["c"].healthy and not by_id["b"].healthy
    assert by_id["b"].branches == ((0, 0),)
    replicas = {(s.layer, s.branch): s.live_replicas for s in status.branches}
    assert replicas[(0, 0)] == 1 and replicas[(0, 1)] == 2  # b is benched, a and c serve 0:1
    with torch.no_grad():
        alpha = tiny_model.layers[1].weights()
    weights = [s.weight for s in status.branches if s.layer == 1]
    assert weights == pytest.approx(alpha.tolist())
    assert status.policy == repr(policy)
