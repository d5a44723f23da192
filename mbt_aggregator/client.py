"""An async client of one node's ``BranchService``: deadlines on every call, domain errors.

gRPC errors are translated here, at the boundary: a node that reports missing cache positions
raises :class:`CacheGap` with its length, so the caller can replay; anything else raises
:class:`NodeCallError` with the status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from mbt_core.codec import decode, encode
from mbt_core.discovery import CACHE_LENGTH_METADATA
from mbt_core.errors import MbtError
from mbt_core.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc


class NodeCallError(MbtError):
    """A call to a node failed (unreachable, refused, timed out)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details


class CacheGap(NodeCallError):
    """The node's cache for a session holds fewer positions than the step assumed."""

    def __init__(self, address: str, details: str, length: int) -> None:
        super().__init__(address, grpc.StatusCode.FAILED_PRECONDITION, details)
        self.length = length


@dataclass(frozen=True)
class StepSpec:
    session_id: str
    start: int
    length: int


class NodeClient:
    def __init__(self, address: str, max_message_bytes: int = 64 << 20) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.BranchServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def describe(self, timeout_s: float) -> pb.DescribeResponse:
        try:
            return await self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc

    async def forward(
        self,
        layer: int,
        branches: Sequence[int],
        steps: Sequence[StepSpec],
        inputs: torch.Tensor,
        timeout_s: float,
    ) -> tuple[dict[int, torch.Tensor], float]:
        """Outputs per branch (packed like ``inputs``) and the node's compute seconds."""
        request = pb.ForwardRequest(
            layer=layer,
            branches=list(branches),
            steps=[
                pb.SessionStep(session_id=s.session_id, start=s.start, length=s.length)
                for s in steps
            ],
            inputs=encode(inputs),
        )
        try:
            response = await self._stub.Forward(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc
        outputs = {o.branch: decode(o.outputs) for o in response.outputs}
        if sorted(outputs) != sorted(branches):
            raise NodeCallError(
                self.address,
                grpc.StatusCode.INTERNAL,
                f"answered branches {sorted(outputs)}, asked {sorted(branches)}",
            )
        return outputs, response.compute_seconds

    async def end_session(self, session_id: str, timeout_s: float) -> int:
        try:
            reply = await self._stub.EndSession(
                pb.EndSessionRequest(session_id=session_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc
        return reply.released_caches

    def _translate(self, exc: grpc.aio.AioRpcError) -> NodeCallError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            for key, value in exc.trailing_metadata() or ():
                if key == CACHE_LENGTH_METADATA:
                    return CacheGap(self.address, details, int(value))
        return NodeCallError(self.address, code, details)
