"""In-process fake nodes for the gateway's unit tests: real branches of a model, a node's
cache rules (a step past a cache's length is refused with its length), no network."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.client import Payload
from mbt_aggregator.engine import Engine
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, Registry
from mbt_core.errors import CacheGap, NodeRefused, NodeUnavailable
from mbt_core.model.config import AggregationConfig
from mbt_core.model.kv import BranchCache
from mbt_core.model.lm import MBTLanguageModel
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
            raise NodeUnavailable("fake", "down")
        if self.refuse is not None:
            raise NodeRefused("fake", self.refuse)
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


def make_engine(
    model: MBTLanguageModel,
    layout: dict[str, list[tuple[int, int]]],
    policy: FanoutPolicy | None = None,
) -> tuple[Engine, dict[str, FakeClient]]:
    """An engine over fake nodes named as ``layout`` says, serving the branches it lists."""
    registry = Registry()
    clients = {}
    for name, served in layout.items():
        clients[name] = FakeClient(model)
        registry.add(Node(name, name, clients[name], frozenset(served)))  # type: ignore[arg-type]
    engine = Engine(
        model, registry, policy or FanoutPolicy(), AggregationConfig(), Metrics(CollectorRegistry())
    )
    return engine, clients


def all_branches(model: MBTLanguageModel) -> list[tuple[int, int]]:
    return [(li, b) for li, k in enumerate(model.cfg.branches) for b in range(k)]
