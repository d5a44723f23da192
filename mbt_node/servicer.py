"""``mbt.v1.BranchService``: validate at the boundary, batch below, abort with a clear status.

The layers below, and the checks here, raise domain errors (the kinds of
:class:`mbt_core.errors.SessionRefused`, and :mod:`mbt_node.errors`); :data:`STATUS_OF` is the
one table that turns them into gRPC status codes, and :func:`status_of` adds the cache length
trailer. Every call is made by a :class:`Caller`: the certificate it presented under TLS, else
its host; the session store binds sessions to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import NamedTuple, NoReturn

import grpc
import torch

from mbt_core.errors import (
    CacheBehind,
    CertificateError,
    CodecError,
    LimitExceeded,
    MbtError,
    NotSessionOwner,
    OutOfContext,
    SessionEnded,
    SessionRefused,
)
from mbt_core.trust.certs import public_key_fingerprint
from mbt_core.wire.codec import decode, encode_into, wire_dtype
from mbt_core.wire.contract import (
    CACHE_LENGTH_METADATA,
    PROTOCOL_VERSION,
    SessionStep,
    format_branches,
)
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_node.batcher import BranchResult
from mbt_node.errors import BranchNotServed, InvalidRequest, NodeLoading
from mbt_node.faults import corrupt
from mbt_node.metrics import NodeMetrics
from mbt_node.runtime import NodeRuntime
from mbt_node.sessions import MAX_SECRET_BYTES, MIN_SECRET_BYTES, Caller

log = logging.getLogger("mbt_node")
MAX_SESSION_ID = 128
STATUS_OF: dict[type[MbtError], grpc.StatusCode] = {
    NodeLoading: grpc.StatusCode.UNAVAILABLE,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    BranchNotServed: grpc.StatusCode.NOT_FOUND,
    CacheBehind: grpc.StatusCode.FAILED_PRECONDITION,
    SessionEnded: grpc.StatusCode.FAILED_PRECONDITION,
    OutOfContext: grpc.StatusCode.OUT_OF_RANGE,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotSessionOwner: grpc.StatusCode.PERMISSION_DENIED,
    SessionRefused: grpc.StatusCode.FAILED_PRECONDITION,  # a kind not listed above
}
REFUSALS = tuple(STATUS_OF)  # what a call may raise on purpose; anything else is a bug


def refusal_kind(err: MbtError) -> type[MbtError]:
    """The nearest class of ``err`` in :data:`STATUS_OF`: what decides its code and label."""
    return next(c for c in type(err).__mro__ if c in STATUS_OF)


class Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()


def status_of(err: MbtError) -> Status:
    """The gRPC form of a refusal: the code of its nearest class in :data:`STATUS_OF`, and for
    a cache behind the step, its length in the ``mbt-cache-length`` trailer."""
    code = STATUS_OF[refusal_kind(err)]
    trailers = ((CACHE_LENGTH_METADATA, str(err.length)),) if isinstance(err, CacheBehind) else ()
    return Status(code, str(err), trailers)


async def abort(context: grpc.aio.ServicerContext, err: MbtError) -> NoReturn:
    status = status_of(err)
    await context.abort(status.code, status.details, trailing_metadata=status.trailers)
    raise AssertionError("unreachable: abort raises")


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The certificate's fingerprint under TLS (authenticated), else the peer's host."""
    certs = context.auth_context().get("x509_pem_cert")
    if certs:
        return _certified(certs[0])
    peer = context.peer() or ""  # "ipv4:127.0.0.1:50312", "ipv6:[::1]:50312"
    return Caller("host:" + peer.rsplit(":", 1)[0], authenticated=False)


@lru_cache(maxsize=256)
def _certified(pem: bytes) -> Caller:
    try:
        return Caller("cert:" + public_key_fingerprint(pem), authenticated=True)
    except CertificateError:  # the handshake verified it; unreadable here means no identity
        return Caller("cert:unreadable", authenticated=False)


class BranchServicer(pb_grpc.BranchServiceServicer):
    """Answers UNAVAILABLE until ``runtime`` is set (the node is still loading); counts every
    refusal in ``metrics``."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.runtime: NodeRuntime | None = None
        self.draining = asyncio.Event()  # set on SIGTERM: open streams end once idle
        self.metrics = metrics

    async def _abort(self, context: grpc.aio.ServicerContext, err: MbtError) -> NoReturn:
        self.metrics.refused(refusal_kind(err))
        await abort(context, err)

    def _ready(self) -> NodeRuntime:
        if self.runtime is None:
            raise NodeLoading()
        return self.runtime

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResponse:
        try:
            rt = self._ready()
        except NodeLoading as err:
            await self._abort(context, err)
        cfg = rt.manifest.config
        lim = rt.cfg.limits
        return pb.DescribeResponse(
            node_id=rt.node_id,
            model_id=rt.manifest.model_id,
            model_version=rt.manifest.model_version,
            manifest_sha256=rt.manifest_sha256,
            branches=[
                pb.ServedBranch(
                    layer=lay, branch=b, artifact_sha256=rt.manifest.branch(lay, b).sha256
                )
                for lay, b in sorted(rt.branches)
            ],
            device=rt.cfg.device,
            dtype=wire_dtype(rt.dtype),
            protocol_version=PROTOCOL_VERSION,
            limits=pb.Limits(
                max_sessions=lim.max_sessions,
                max_cached_tokens=lim.max_cached_tokens,
                max_message_bytes=lim.message_bytes(cfg.d_model, len(rt.branches)),
                max_steps_per_call=lim.max_steps_per_call,
                max_tokens_per_call=lim.max_tokens_per_call,
                max_sessions_per_caller=min(lim.max_sessions_per_caller, lim.max_sessions),
                max_cached_tokens_per_caller=min(
                    lim.max_cached_tokens_per_caller, lim.max_cached_tokens
                ),
            ),
            d_model=cfg.d_model,
            context_length=cfg.context_length,
            open_sessions=rt.store.session_count,
            cached_tokens=rt.store.cached_tokens(),
        )

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        try:
            response = pb.ForwardResponse()
            await self._forward(request, response, caller_of(context))
            return response
        except REFUSALS as err:
            await self._abort(context, err)

    async def ForwardStream(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Run each request as it arrives, reply as each finishes (matched by request id).

        Each request's task writes its own reply (one write at a time), with no queue between:
        a one-token step is taken, computed and answered without waiting on another task.
        """
        writing = asyncio.Lock()
        running: set[asyncio.Task[None]] = set()
        caller = caller_of(context)  # one connection, one caller

        async def answer(request: pb.ForwardRequest) -> None:
            reply = pb.ForwardReply(request_id=request.request_id)
            try:
                await self._forward(request, reply.response, caller)  # built in place
            except REFUSALS as err:
                self.metrics.refused(refusal_kind(err))
                reply = pb.ForwardReply(request_id=request.request_id, error=_call_error(err))
            except Exception as exc:  # a bug must not leave the caller waiting in silence
                log.exception("Forward failed")
                reply = pb.ForwardReply(
                    request_id=request.request_id,
                    error=pb.CallError(code=grpc.StatusCode.INTERNAL.value[0], details=str(exc)),
                )
            async with writing:
                try:
                    await context.write(reply)
                except Exception as exc:  # the stream is gone: the caller gave up on it
                    log.debug("reply %d not sent: %s", request.request_id, exc)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.get_running_loop().create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except asyncio.CancelledError:
                pass  # draining: take no more requests, finish those taken
            except Exception as exc:  # the client went away: answer what was taken, then end
                log.debug("stream reader stopped: %s", exc)
            finally:
                while running:  # taken requests always get their reply, even when cancelled
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait(list(running))

        loop = asyncio.get_running_loop()
        reader = loop.create_task(read())
        drain = loop.create_task(self.draining.wait())
        drain.add_done_callback(lambda _: reader.cancel())
        try:
            await reader
        finally:
            drain.cancel()
            reader.cancel()

    async def _forward(
        self, request: pb.ForwardRequest, response: pb.ForwardResponse, caller: Caller
    ) -> None:
        """Run ``request`` and write its outputs into ``response``, in the dtype the inputs
        came in (the caller's wire dtype), whatever this node computes in."""
        rt = self._ready()
        steps, inputs, sent = _validate(rt, request)
        if rt.cfg.delay_ms:  # fault injection: a slow machine
            await asyncio.sleep(rt.cfg.delay_ms / 1000)
        layer, branches = request.layer, request.branches
        results: list[BranchResult | BaseException]
        if len(branches) == 1:  # the usual case: no task to gather (a failure raises)
            results = [await rt.batchers[(layer, branches[0])].submit(steps, inputs, caller)]
        else:
            jobs = [rt.batchers[(layer, b)].submit(steps, inputs, caller) for b in branches]
            results = await asyncio.gather(*jobs, return_exceptions=True)
        done = [r for r in results if isinstance(r, BranchResult)]
        if len(done) != len(results):
            raise next(r for r in results if isinstance(r, BaseException))
        for b, result in zip(branches, done, strict=True):
            out = corrupt(rt.cfg.test_fault, result.outputs)
            encode_into(response.outputs.add(branch=b).outputs, out.to(sent))
        response.compute_seconds = max(r.compute_seconds for r in done)

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        try:
            rt = self._ready()
            released = rt.store.end(request.session_id, request.secret, caller_of(context))
        except REFUSALS as err:
            await self._abort(context, err)
        return pb.EndSessionResponse(released_caches=released)


def _call_error(err: MbtError) -> pb.CallError:
    """A refusal as a stream reply carries it: the same code and cache length as an abort."""
    status = status_of(err)
    error = pb.CallError(code=status.code.value[0], details=status.details)
    if isinstance(err, CacheBehind):
        error.cache_length = err.length
    return error


def _validate(
    rt: NodeRuntime, request: pb.ForwardRequest
) -> tuple[list[SessionStep], torch.Tensor, torch.dtype]:
    """Every check that needs no cache: served branches, steps, tensor dtype/shape/values.
    Returns the steps, the inputs in this node's dtype, and the dtype they were sent in."""
    lim, cfg = rt.cfg.limits, rt.manifest.config
    layer, branches, wire_steps = request.layer, request.branches, request.steps
    if not branches:
        raise InvalidRequest("no branches requested")
    if len(branches) > 1 and len(set(branches)) != len(branches):
        raise InvalidRequest("a branch is requested twice")
    missing = [b for b in branches if (layer, b) not in rt.branches]
    if missing:
        raise BranchNotServed(
            f"layer {layer} branch {missing[0]} is not served by this node "
            f"(it serves {format_branches(tuple(sorted(rt.branches)))})",
        )
    if not wire_steps:
        raise InvalidRequest("no session steps given")
    if len(wire_steps) > lim.max_steps_per_call:
        raise InvalidRequest(
            f"{len(wire_steps)} steps exceed the limit of {lim.max_steps_per_call}"
        )
    steps = [SessionStep(s.session_id, s.start, s.length, s.secret) for s in wire_steps]
    if len(steps) > 1 and len({s.session_id for s in steps}) != len(steps):
        raise InvalidRequest("a session appears twice in one call")
    for i, s in enumerate(steps):
        if not s.session_id or len(s.session_id) > MAX_SESSION_ID:
            raise InvalidRequest(f"session ids must have 1..{MAX_SESSION_ID} characters")
        if s.length == 0:
            raise InvalidRequest(f"step {i}: step length must be positive")
        if not MIN_SECRET_BYTES <= len(s.secret) <= MAX_SECRET_BYTES:
            raise InvalidRequest(
                f"step {i}: a session secret has {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes, "
                f"got {len(s.secret)} (protocol version {PROTOCOL_VERSION})"
            )
    total = sum(s.length for s in steps)
    if total > lim.max_tokens_per_call:
        raise InvalidRequest(
            f"{total} positions exceed the limit of {lim.max_tokens_per_call} per call"
        )
    try:
        x = decode(request.inputs, max_elements=lim.max_tokens_per_call * cfg.d_model)
    except CodecError as exc:
        raise InvalidRequest(f"inputs: {exc}") from exc
    if x.dim() != 2 or x.shape[1] != cfg.d_model:
        raise InvalidRequest(
            f"inputs must have shape (positions, {cfg.d_model}), got {tuple(x.shape)}"
        )
    if x.shape[0] != total:
        raise InvalidRequest(f"inputs hold {x.shape[0]} positions, the steps add up to {total}")
    # A finite sum proves every value finite (NaN and Inf propagate) in one cheap op; only a
    # non-finite sum, NaN/Inf or a float overflow of huge values, needs the exact check.
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise InvalidRequest("inputs contain NaN or Inf")
    sent = x.dtype
    return steps, x.to(device=rt.cfg.device, dtype=rt.dtype), sent
