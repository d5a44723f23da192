"""An async client of one node's ``BranchService``: deadlines on every call, domain errors.

Forwards travel over one long-lived ``ForwardStream`` per node (a stream message costs a
fraction of a unary call's client work, which is what a fan-out pays four times per layer);
replies are matched by request id. A broken stream fails its pending calls and the next call
opens a new one. A late reply (past the caller's timeout) is dropped: the node still computed
it, so its cache has no hole.

gRPC errors are translated here, at the boundary: a node that reports missing cache positions
raises :class:`CacheGap` with its length, so the caller can replay; anything else raises
:class:`NodeCallError` with the status code. Outputs come back in the wire dtype the request
was sent in and are handed on as float32 (what the trunk fuses in).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbt_core.errors import MbtError
from mbt_core.trust.certs import TlsMaterial, node_id_hostname
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.contract import CACHE_LENGTH_METADATA
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc


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
    secret: bytes  # binds the session to this gateway (protocol version 2)


@dataclass(frozen=True)
class Payload:
    """What every node of a fan-out is sent: a layer, session steps and their inputs.

    Serialized once for all nodes: each node's branches and request id are serialized alone
    and appended (protobuf merges concatenated messages), so a fan-out copies and encodes its
    inputs once, not once per node. The message fields stay for callers that want them.
    """

    layer: int
    steps: list[pb.SessionStep]
    inputs: pb.Tensor
    data: bytes

    @classmethod
    def of(
        cls,
        layer: int,
        steps: Sequence[StepSpec | pb.SessionStep],
        inputs: torch.Tensor | pb.Tensor,
    ) -> Payload:
        wire_steps = [
            s
            if isinstance(s, pb.SessionStep)
            else pb.SessionStep(
                session_id=s.session_id, start=s.start, length=s.length, secret=s.secret
            )
            for s in steps
        ]
        tensor = inputs if isinstance(inputs, pb.Tensor) else encode(inputs)
        request = pb.ForwardRequest(layer=layer, steps=wire_steps, inputs=tensor)
        return cls(layer, wire_steps, tensor, request.SerializeToString())

    def request(self, branches: Sequence[int], request_id: int) -> bytes:
        """The serialized ``ForwardRequest`` for one node."""
        own = pb.ForwardRequest(branches=branches, request_id=request_id)
        return self.data + own.SerializeToString()


_FORWARD_STREAM = "/mbt.v1.BranchService/ForwardStream"
BRANCH_SERVICE = pb.DESCRIPTOR.services_by_name["BranchService"].full_name


class _Stream:
    """One open ``ForwardStream``: writes one at a time, a reader resolving replies by id.
    Requests travel as serialized bytes (see :class:`Payload`)."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self._call = channel.stream_stream(
            _FORWARD_STREAM, response_deserializer=pb.ForwardReply.FromString
        )()
        self._pending: dict[int, asyncio.Future[pb.ForwardReply]] = {}
        self._write_lock = asyncio.Lock()
        self.closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def request(self, request_id: int, request: bytes) -> pb.ForwardReply:
        future: asyncio.Future[pb.ForwardReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await self._call.write(request)
            return await future
        except grpc.aio.AioRpcError as exc:  # the stream broke (refused, reset) while writing
            self.closed = True
            raise NodeCallError(self.address, exc.code(), exc.details() or "") from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:  # it had already ended
            self.closed = True
            raise NodeCallError(self.address, grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the reader may have failed it meanwhile

    async def _read(self) -> None:
        error = NodeCallError(self.address, grpc.StatusCode.UNAVAILABLE, "stream ended")
        try:
            async for reply in self._call:
                future = self._pending.get(reply.request_id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = NodeCallError(self.address, exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = NodeCallError(self.address, grpc.StatusCode.CANCELLED, "client closed")
        finally:
            self.closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def node_channel(
    address: str,
    options: Sequence[tuple[str, object]],
    tls: TlsMaterial | None = None,
    node_id: str | None = None,
) -> grpc.aio.Channel:
    """Plaintext, or mutual TLS whose handshake completes only when the server holds a
    certificate from the cluster CA for ``node_id`` (its id name is checked, not the address)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    if node_id is None:
        raise ValueError(f"{address}: a TLS channel to a node needs the node id it must prove")
    credentials = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
    pinned = ("grpc.ssl_target_name_override", node_id_hostname(node_id))
    return grpc.aio.secure_channel(address, credentials, options=[*options, pinned])


class NodeClient:
    def __init__(
        self,
        address: str,
        max_message_bytes: int = 64 << 20,
        tls: TlsMaterial | None = None,
        node_id: str | None = None,
    ) -> None:
        self.address = address
        self._channel = node_channel(
            address,
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
            tls,
            node_id,
        )
        self._stub = pb_grpc.BranchServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        await self._channel.close()

    async def describe(self, timeout_s: float) -> pb.DescribeResponse:
        try:
            return await self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc

    async def serving(self, timeout_s: float) -> bool:
        """Whether the node's gRPC health service says its branches are being served (False
        while it loads or drains, and when it does not answer)."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=BRANCH_SERVICE), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def send(
        self, payload: Payload, branches: Sequence[int], timeout_s: float
    ) -> tuple[dict[int, torch.Tensor], float]:
        """A Forward of ``payload`` (one serves a whole fan-out) for ``branches``: outputs per
        branch, packed like the payload's inputs, and the node's compute seconds."""
        request_id = next(self._ids)
        if self._stream is None or self._stream.closed:
            self._stream = _Stream(self._channel, self.address)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self._stream.request(
                    request_id, payload.request(branches, request_id)
                )
        except TimeoutError:
            raise NodeCallError(
                self.address, grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply in {timeout_s:.3g} s"
            ) from None
        if reply.HasField("error"):
            e = reply.error
            cache = e.cache_length if e.HasField("cache_length") else None
            raise self._error(_CODES.get(e.code, grpc.StatusCode.UNKNOWN), e.details, cache)
        response = reply.response
        outputs = {o.branch: decode(o.outputs).float() for o in response.outputs}
        if len(outputs) != len(branches) or any(b not in outputs for b in branches):
            raise NodeCallError(
                self.address,
                grpc.StatusCode.INTERNAL,
                f"answered branches {sorted(outputs)}, asked {sorted(branches)}",
            )
        return outputs, response.compute_seconds

    async def end_session(self, session_id: str, secret: bytes, timeout_s: float) -> int:
        try:
            reply = await self._stub.EndSession(
                pb.EndSessionRequest(session_id=session_id, secret=secret), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc
        return reply.released_caches

    def _translate(self, exc: grpc.aio.AioRpcError) -> NodeCallError:
        cache = None
        for key, value in exc.trailing_metadata() or ():
            if key == CACHE_LENGTH_METADATA:
                cache = int(value)
        return self._error(exc.code(), exc.details() or "", cache)

    def _error(self, code: grpc.StatusCode, details: str, cache: int | None) -> NodeCallError:
        if code == grpc.StatusCode.FAILED_PRECONDITION and cache is not None:
            return CacheGap(self.address, details, cache)
        return NodeCallError(self.address, code, details)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
