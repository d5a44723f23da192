"""The node client's edge: gRPC status codes into the error tree (one table), ``Describe``
into a :class:`NodeInfo`, a payload of contract steps into the bytes a node reads.

A small in-process gRPC server stands in for a node, so the codes, details and trailers travel
as they do on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import torch

from mbt_aggregator.client import NodeClient, Payload, node_error
from mbt_core.errors import (
    NODE_TROUBLE,
    CacheBehind,
    CacheGap,
    NodeCallError,
    NodeFailed,
    NodeOverloaded,
    NodeRefused,
    NodeTimeout,
    NodeUnavailable,
)
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.contract import CACHE_LENGTH_METADATA, NodeInfo, SessionStep
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc

C = grpc.StatusCode
# Written out here, apart from the client's table: what each code must mean to the gateway.
EXPECTED: dict[grpc.StatusCode, type[NodeCallError]] = {
    C.UNAVAILABLE: NodeUnavailable,
    C.DEADLINE_EXCEEDED: NodeTimeout,
    C.RESOURCE_EXHAUSTED: NodeOverloaded,
    C.INTERNAL: NodeFailed,
    C.UNKNOWN: NodeFailed,
    C.CANCELLED: NodeFailed,
    C.FAILED_PRECONDITION: NodeRefused,
    C.INVALID_ARGUMENT: NodeRefused,
    C.OUT_OF_RANGE: NodeRefused,
    C.PERMISSION_DENIED: NodeRefused,
    C.UNAUTHENTICATED: NodeRefused,
    C.NOT_FOUND: NodeRefused,
    C.ALREADY_EXISTS: NodeRefused,
    C.ABORTED: NodeRefused,
    C.UNIMPLEMENTED: NodeRefused,
    C.DATA_LOSS: NodeRefused,
}
# The codes whose failure benches a node (down, slow, overloaded, broken): the others are
# refusals of one request, which say nothing against the node.
TROUBLE = {
    C.UNAVAILABLE,
    C.DEADLINE_EXCEEDED,
    C.RESOURCE_EXHAUSTED,
    C.INTERNAL,
    C.UNKNOWN,
    C.CANCELLED,
}


@pytest.mark.parametrize("code", [c for c in C if c != C.OK], ids=lambda c: c.name)
def test_every_status_code_maps_to_its_kind(code: grpc.StatusCode) -> None:
    err = node_error("10.0.0.1:7001", code, "what the node said")
    assert type(err) is EXPECTED[code]
    assert isinstance(err, NODE_TROUBLE) == (code in TROUBLE)
    assert (err.address, err.details, err.status) == (
        "10.0.0.1:7001",
        "what the node said",
        code.name,
    )
    assert str(err) == f"10.0.0.1:7001: {code.name}: what the node said"  # as users saw it


def test_only_a_failed_precondition_with_a_length_is_a_cache_gap() -> None:
    gap = node_error("n", C.FAILED_PRECONDITION, "behind", cache_length=7)
    assert isinstance(gap, CacheGap) and isinstance(gap, CacheBehind) and gap.length == 7
    assert isinstance(gap, NodeRefused) and not isinstance(gap, NODE_TROUBLE)
    assert type(node_error("n", C.OUT_OF_RANGE, "x", cache_length=7)) is NodeRefused


class _Node(pb_grpc.BranchServiceServicer):
    """A node that fails as told: ``describe`` and ``forward`` give what each RPC does."""

    def __init__(self) -> None:
        self.describe: Callable[[grpc.aio.ServicerContext], Awaitable[pb.DescribeResponse]]
        self.forward: Callable[[pb.ForwardRequest], pb.ForwardReply]
        self.requests: list[pb.ForwardRequest] = []

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResponse:
        return await self.describe(context)

    async def ForwardStream(
        self, requests: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardReply]:
        async for request in requests:
            self.requests.append(request)
            reply = self.forward(request)
            reply.request_id = request.request_id
            yield reply


def _run(node: _Node, test: Callable[[NodeClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = grpc.aio.server()
        pb_grpc.add_BranchServiceServicer_to_server(node, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = NodeClient(f"127.0.0.1:{port}")
        try:
            return await test(client)
        finally:
            await client.close()
            await server.stop(None)

    return asyncio.run(main())


def test_a_refusal_with_the_cache_trailer_carries_the_nodes_length() -> None:
    node = _Node()

    async def refuse(context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        context.set_trailing_metadata(((CACHE_LENGTH_METADATA, "12"),))
        await context.abort(C.FAILED_PRECONDITION, "cache holds 12 positions")
        raise AssertionError("abort raises")

    node.describe = refuse
    with pytest.raises(CacheGap) as caught:
        _run(node, lambda client: client.describe(5.0))
    assert caught.value.length == 12 and "FAILED_PRECONDITION: cache holds 12" in str(caught.value)


def test_a_stream_reply_error_goes_through_the_same_table() -> None:
    node = _Node()
    node.forward = lambda _: pb.ForwardReply(
        error=pb.CallError(code=C.FAILED_PRECONDITION.value[0], details="behind", cache_length=3)
    )
    step = SessionStep("s" * 32, 3, 1, b"k" * 16)
    payload = Payload.of(0, [step], torch.zeros(1, 4))
    with pytest.raises(CacheGap) as caught:
        _run(node, lambda client: client.send(payload, [0], 5.0))
    assert caught.value.length == 3
    node.forward = lambda _: pb.ForwardReply(
        error=pb.CallError(code=C.RESOURCE_EXHAUSTED.value[0], details="quota")
    )
    with pytest.raises(NodeOverloaded, match="RESOURCE_EXHAUSTED: quota"):
        _run(node, lambda client: client.send(payload, [0], 5.0))


def test_no_reply_in_time_is_a_timeout() -> None:
    node = _Node()

    def never(request: pb.ForwardRequest) -> pb.ForwardReply:
        raise AssertionError("unreachable")

    async def slow_stream(
        requests: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardReply]:
        async for _ in requests:
            await asyncio.sleep(10)
        yield pb.ForwardReply()

    node.forward = never
    node.ForwardStream = slow_stream  # type: ignore[method-assign]
    payload = Payload.of(0, [SessionStep("s", 0, 1, b"k" * 16)], torch.zeros(1, 4))
    with pytest.raises(NodeTimeout, match=r"DEADLINE_EXCEEDED: no reply in 0\.2 s"):
        _run(node, lambda client: client.send(payload, [0], 0.2))


def test_the_payload_is_what_a_node_reads_and_outputs_come_back_per_branch() -> None:
    node = _Node()

    def double(request: pb.ForwardRequest) -> pb.ForwardReply:
        x = decode(request.inputs).float()
        outputs = [pb.BranchOutput(branch=b, outputs=encode(2 * x)) for b in request.branches]
        return pb.ForwardReply(response=pb.ForwardResponse(outputs=outputs))

    node.forward = double
    steps = [SessionStep("a" * 32, 0, 2, b"1" * 16), SessionStep("b" * 32, 5, 1, b"2" * 16)]
    x = torch.randn(3, 4)
    outs, _ = _run(node, lambda client: client.send(Payload.of(1, steps, x), [0, 2], 5.0))
    (request,) = node.requests
    assert request.layer == 1 and list(request.branches) == [0, 2]
    got = [SessionStep(s.session_id, s.start, s.length, s.secret) for s in request.steps]
    assert got == steps
    assert sorted(outs) == [0, 2] and all(torch.equal(o, 2 * x) for o in outs.values())


def test_describe_is_read_into_the_contract() -> None:
    node = _Node()
    reply = pb.DescribeResponse(
        node_id="n1",
        model_id="m",
        model_version=3,
        manifest_sha256="d" * 64,
        branches=[pb.ServedBranch(layer=1, branch=2, artifact_sha256="a" * 64)],
        device="cpu",
        dtype=pb.DTYPE_BFLOAT16,
        protocol_version=2,
        limits=pb.Limits(max_steps_per_call=8, max_sessions_per_caller=5, max_message_bytes=99),
        d_model=32,
        context_length=48,
        open_sessions=4,
        cached_tokens=17,
    )

    async def describe(context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        return reply

    node.describe = describe
    info = _run(node, lambda client: client.describe(5.0))
    assert isinstance(info, NodeInfo)
    assert (info.node_id, info.model_version, info.dtype) == ("n1", 3, pb.DTYPE_BFLOAT16)
    assert [(b.key, b.artifact_sha256) for b in info.branches] == [((1, 2), "a" * 64)]
    assert (info.limits.max_steps_per_call, info.limits.max_sessions_per_caller) == (8, 5)
    assert info.limits.max_message_bytes == 99 and info.limits.max_sessions == 0
    assert (info.d_model, info.context_length, info.open_sessions, info.cached_tokens) == (
        32,
        48,
        4,
        17,
    )
