"""gRPC server pieces that node and gateway share (both import ``mbt_core``, never each other).

- :class:`MalformedRequests`: grpc turns bytes that are no valid protobuf into ``UNKNOWN`` and
  logs a traceback for every one, so a peer could fill the logs at will. This interceptor parses
  requests itself: an undecodable unary request ends with ``INVALID_ARGUMENT`` and one debug
  line; an undecodable message on a request stream ends that stream's reading (what was taken
  before it is still answered).
- :class:`Guard`: awaits a check of the caller (its certificate role, its token) before every
  call but health checks; :func:`role_check` is the certificate-role check node and gateway use.
- :class:`PerClientLimit`: at most N calls of one client at once (``RESOURCE_EXHAUSTED``
  beyond), so one flooding client cannot take every slot from the others. It counts in a
  :class:`ClientSlots`, which the gateway's HTTP API shares: one limit over both APIs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mbt_core.errors import CertificateError
from mbt_core.trust.certs import certificate_role

log = logging.getLogger("mbt_core.wire.server")
OPEN_PREFIX = "/grpc.health.v1.Health/"  # probes (docker, Kubernetes exec) pass every guard
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]
# Around a servicer method: may abort, and yields the request (or request iterator) to use.
Around = Callable[[Any, grpc.aio.ServicerContext, bool], AbstractAsyncContextManager[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    around: Around,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler run inside ``around``. grpc tells coroutines from async generators by
    the function's kind, so the wrapper keeps the kind of the method it wraps."""
    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    inner = getattr(handler, kind)
    streaming = kind.startswith("stream")
    behaviour: Callable[..., Any]
    if inspect.isasyncgenfunction(inner):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(request, context, streaming) as request:
                async for reply in inner(request, context):
                    yield reply

        behaviour = streamed
    else:

        async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(request, context, streaming) as request:
                return await inner(request, context)

        behaviour = awaited
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MalformedMessageError(Exception):
    """A request message on a stream that does not parse."""


class _Malformed:
    def __init__(self, details: str) -> None:
        self.details = details


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Malformed(f"request is not a valid message: {exc}")

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            log.debug("stream message refused: %s", request.details)
            raise MalformedMessageError(request.details)
        yield request


@asynccontextmanager
async def _refuse_malformed(
    request: Any, context: grpc.aio.ServicerContext, streaming: bool
) -> Any:
    if streaming:
        yield _checked(request)
        return
    if isinstance(request, _Malformed):
        log.debug("request refused: %s", request.details)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
    yield request


class _Wrapping(grpc.aio.ServerInterceptor):
    """An interceptor that runs the handlers of the methods it ``applies`` to inside
    ``around`` (see :func:`wrap_handler`)."""

    def applies(self, method: str) -> bool:
        return True

    @abstractmethod
    def around(
        self, request: Any, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AbstractAsyncContextManager[Any]:
        """The context the handler runs in: may abort; yields the request to use."""

    def deserializer(self, handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any] | None:
        return None  # the handler's own

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.applies(details.method):
            return handler
        return wrap_handler(handler, self.around, self.deserializer(handler))


class MalformedRequests(_Wrapping):
    def around(
        self, request: Any, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AbstractAsyncContextManager[Any]:
        return _refuse_malformed(request, context, streaming)

    def deserializer(self, handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any] | None:
        return _tolerant(handler.request_deserializer)


class Guard(_Wrapping):
    """Awaits ``check(context)`` before every call but health checks."""

    def __init__(self, check: Check) -> None:
        self._check = check

    def applies(self, method: str) -> bool:
        return not method.startswith(OPEN_PREFIX)

    @asynccontextmanager
    async def around(
        self, request: Any, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[Any]:
        await self._check(context)
        yield request


class ClientSlots:
    """How many requests each client runs at once, against one limit. One instance serves
    every API of a process (the gateway's gRPC and HTTP): a client cannot double its share by
    using both."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}

    @property
    def refusal(self) -> str:
        return (
            f"this client already has {self.limit} requests running (the per-client limit); "
            "wait for one to finish"
        )

    def take(self, client: str) -> bool:
        """One more request of ``client``; False, and nothing taken, at its limit."""
        if self._running.get(client, 0) >= self.limit:
            return False
        self._running[client] = self._running.get(client, 0) + 1
        return True

    def give_back(self, client: str) -> None:
        self._running[client] -= 1
        if not self._running[client]:
            del self._running[client]


class PerClientLimit(_Wrapping):
    """At most ``limit`` calls at once per client, on the methods under ``prefix``.

    The client is who the connection proves it is: its certificate's key, else its bearer
    token (hashed), else its address (a trusted LAN: one host, one client).
    """

    def __init__(self, limit: int | ClientSlots, prefix: str) -> None:
        self.slots = limit if isinstance(limit, ClientSlots) else ClientSlots(limit)
        self._prefix = prefix

    def applies(self, method: str) -> bool:
        return method.startswith(self._prefix)

    @asynccontextmanager
    async def around(
        self, request: Any, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[Any]:
        client = client_identity(context)
        if not self.slots.take(client):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.refusal)
        try:
            yield request
        finally:
            self.slots.give_back(client)


def client_identity(context: grpc.aio.ServicerContext) -> str:
    """Certificate key, else token digest, else peer host: who the connection proves it is."""
    certs = context.auth_context().get("x509_pem_cert")
    token = dict(context.invocation_metadata() or ()).get("authorization")
    peer = context.peer() or ""  # "ipv4:127.0.0.1:50312", "ipv6:[::1]:50312"
    return identity(certs[0] if certs else None, str(token) if token else None, peer)


def identity(cert_pem: bytes | None, authorization: str | None, peer: str) -> str:
    """:func:`client_identity` from its parts (an HTTP request has them too); ``peer`` in
    grpc's form, ``ipv4:HOST:PORT`` or ``ipv6:[HOST]:PORT``."""
    if cert_pem:
        return "cert:" + hashlib.sha256(cert_pem).hexdigest()
    if authorization:
        return "token:" + hashlib.sha256(authorization.encode()).hexdigest()
    return "peer:" + peer.rsplit(":", 1)[0]


def role_check(roles: frozenset[str], what: str) -> Check:
    """PERMISSION_DENIED unless the caller's certificate was issued for one of ``roles``."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        certs = context.auth_context().get("x509_pem_cert") or [b""]
        role = _role(certs[0])
        if role not in roles:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {role or 'role-less'} certificate may not {what}; "
                f"only {', '.join(sorted(roles))} certificates may",
            )

    return check


@lru_cache(maxsize=256)
def _role(pem: bytes) -> str | None:
    try:
        return certificate_role(pem) if pem else None
    except CertificateError:
        return None
