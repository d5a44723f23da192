"""An async client of one node's ``BranchService``: deadlines on every call, domain errors.

Forwards travel over one long-lived ``ForwardStream`` per node (a stream message costs a
fraction of a unary call's client work, which is what a fan-out pays four times per layer);
replies are matched by request id. A broken stream fails its pending calls and the next call
opens a new one. A late reply (past the caller's timeout) is dropped: the node still computed
it, so its cache has no hole.

gRPC errors are translated here, at the boundary, through one table (:data:`ERROR_OF`) into
the kinds of :class:`mbt_core.errors.NodeCallError` (the client's own failures, a timeout or a
broken stream, go through it too): a node that reports missing cache positions raises
:class:`CacheGap` with its length, so the caller can replay. Above this module nothing reads
a protobuf message: :meth:`NodeClient.describe` returns a :class:`NodeInfo`, and a
:class:`Payload` is made of contract steps and a tensor. Outputs come back in the wire dtype
the request was sent in and are handed on as float32 (what the trunk fuses in).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbt_core.errors import (
    CacheGap,
    NodeCallError,
    NodeFailed,
    NodeOverloaded,
    NodeRefused,
    NodeTimeout,
    NodeUnavailable,
)
from mbt_core.trust.certs import TlsMaterial, node_id_hostname
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.contract import (
    CACHE_LENGTH_METADATA,
    NodeInfo,
    NodeLimits,
    ServedBranch,
    SessionStep,
)
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc

_S = grpc.StatusCode
# The one translation of gRPC status codes into the error tree. The first six say something
# about the node (it is benched for a while); every other code is a refusal of the request.
ERROR_OF: dict[grpc.StatusCode, type[NodeCallError]] = {
    _S.UNAVAILABLE: NodeUnavailable,
    _S.DEADLINE_EXCEEDED: NodeTimeout,
    _S.RESOURCE_EXHAUSTED: NodeOverloaded,
    _S.INTERNAL: NodeFailed,
    _S.UNKNOWN: NodeFailed,
    _S.CANCELLED: NodeFailed,
    _S.FAILED_PRECONDITION: NodeRefused,  # with the cache-length trailer: a CacheGap
    _S.INVALID_ARGUMENT: NodeRefused,
    _S.OUT_OF_RANGE: NodeRefused,
    _S.PERMISSION_DENIED: NodeRefused,
    _S.UNAUTHENTICATED: NodeRefused,
    _S.NOT_FOUND: NodeRefused,
    _S.ALREADY_EXISTS: NodeRefused,
    _S.ABORTED: NodeRefused,
    _S.UNIMPLEMENTED: NodeRefused,
    _S.DATA_LOSS: NodeRefused,
}


def node_error(
    address: str, code: grpc.StatusCode, details: str, cache_length: int | None = None
) -> NodeCallError:
    """The error kind of a failed call; a cache gap when the node said how long its cache is."""
    if code == _S.FAILED_PRECONDITION and cache_length is not None:
        return CacheGap(address, details, cache_length)
    return ERROR_OF.get(code, NodeFailed)(address, details, code.name)


@dataclass(frozen=True)
class Payload:
    """What every node of a fan-out is sent: a layer, session steps and their inputs.

    Serialized once for all nodes: each node's branches and request id are serialized alone
    and appended (protobuf merges concatenated messages), so a fan-out copies and encodes its
    inputs once, not once per node.
    """

    data: bytes  # the layer, the steps and their inputs, serialized

    @classmethod
    def of(cls, layer: int, steps: Sequence[SessionStep], inputs: torch.Tensor) -> Payload:
        wire_steps = [
            pb.SessionStep(session_id=s.session_id, start=s.start, length=s.length, secret=s.secret)
            for s in steps
        ]
        request = pb.ForwardRequest(layer=layer, steps=wire_steps, inputs=encode(inputs))
        return cls(request.SerializeToString())

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
            raise node_error(self.address, exc.code(), exc.details() or "") from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:  # it had already ended
            self.closed = True
            raise node_error(self.address, _S.UNAVAILABLE, str(exc)) from exc
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the reader may have failed it meanwhile

    async def _read(self) -> None:
        error = node_error(self.address, _S.UNAVAILABLE, "stream ended")
        try:
            async for reply in self._call:
                future = self._pending.get(reply.request_id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = node_error(self.address, exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = node_error(self.address, _S.CANCELLED, "client closed")
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

    async def describe(self, timeout_s: float) -> NodeInfo:
        try:
            reply = await self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from exc
        return node_info(reply)

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
            raise node_error(
                self.address, _S.DEADLINE_EXCEEDED, f"no reply in {timeout_s:.3g} s"
            ) from None
        if reply.HasField("error"):
            e = reply.error
            cache = e.cache_length if e.HasField("cache_length") else None
            code = _CODES.get(e.code, _S.UNKNOWN)
            raise node_error(self.address, code, e.details, cache)
        response = reply.response
        outputs = {o.branch: decode(o.outputs).float() for o in response.outputs}
        if len(outputs) != len(branches) or any(b not in outputs for b in branches):
            asked = f"answered branches {sorted(outputs)}, asked {sorted(branches)}"
            raise node_error(self.address, _S.INTERNAL, asked)
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
        return node_error(self.address, exc.code(), exc.details() or "", cache)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def node_info(reply: pb.DescribeResponse) -> NodeInfo:
    """What ``Describe`` said, as the contract spells it."""
    lim = reply.limits
    return NodeInfo(
        node_id=reply.node_id,
        model_id=reply.model_id,
        model_version=reply.model_version,
        manifest_sha256=reply.manifest_sha256,
        branches=tuple(ServedBranch(b.layer, b.branch, b.artifact_sha256) for b in reply.branches),
        device=reply.device,
        dtype=reply.dtype,
        protocol_version=reply.protocol_version,
        limits=NodeLimits(
            max_sessions=lim.max_sessions,
            max_cached_tokens=lim.max_cached_tokens,
            max_message_bytes=lim.max_message_bytes,
            max_steps_per_call=lim.max_steps_per_call,
            max_tokens_per_call=lim.max_tokens_per_call,
            max_sessions_per_caller=lim.max_sessions_per_caller,
            max_cached_tokens_per_caller=lim.max_cached_tokens_per_caller,
        ),
        d_model=reply.d_model,
        context_length=reply.context_length,
        open_sessions=reply.open_sessions,
        cached_tokens=reply.cached_tokens,
    )
