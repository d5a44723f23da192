"""``mbt.v1.BranchService``: validate at the boundary, batch below, abort with a clear status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import grpc
import torch

from mbt_core.codec import decode, encode_into
from mbt_core.discovery import CACHE_LENGTH_METADATA, PROTOCOL_VERSION, format_branches
from mbt_core.errors import CodecError
from mbt_core.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_node.batcher import BranchResult
from mbt_node.faults import corrupt
from mbt_node.runtime import NodeRuntime
from mbt_node.sessions import Step
from mbt_node.status import StatusError

log = logging.getLogger("mbt_node")
MAX_SESSION_ID = 128
_WIRE_DTYPE = {torch.float32: pb.DTYPE_FLOAT32, torch.bfloat16: pb.DTYPE_BFLOAT16}


class BranchServicer(pb_grpc.BranchServiceServicer):
    """Answers UNAVAILABLE until ``runtime`` is set (the node is still loading)."""

    def __init__(self) -> None:
        self.runtime: NodeRuntime | None = None
        self.draining = asyncio.Event()  # set on SIGTERM: open streams end once idle

    def _ready(self) -> NodeRuntime:
        if self.runtime is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "node is loading its branches")
        return self.runtime

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeResponse:
        try:
            rt = self._ready()
        except StatusError as err:
            await context.abort(err.code, err.details)
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
            dtype=_WIRE_DTYPE[rt.dtype],
            protocol_version=PROTOCOL_VERSION,
            limits=pb.Limits(
                max_sessions=lim.max_sessions,
                max_cached_tokens=lim.max_cached_tokens,
                max_message_bytes=lim.message_bytes(cfg.d_model, len(rt.branches)),
                max_steps_per_call=lim.max_steps_per_call,
                max_tokens_per_call=lim.max_tokens_per_call,
            ),
            d_model=cfg.d_model,
            context_length=cfg.context_length,
        )

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        try:
            response = pb.ForwardResponse()
            await self._forward(request, response)
            return response
        except StatusError as err:
            await context.abort(err.code, err.details, trailing_metadata=err.metadata)
            raise  # unreachable: abort raises

    async def ForwardStream(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Run each request as it arrives, reply as each finishes (matched by request id).

        Each request's task writes its own reply (one write at a time), with no queue between:
        a one-token step is taken, computed and answered without waiting on another task.
        """
        writing = asyncio.Lock()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ForwardRequest) -> None:
            reply = pb.ForwardReply(request_id=request.request_id)
            try:
                await self._forward(request, reply.response)  # built in place
            except StatusError as err:
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

    async def _forward(self, request: pb.ForwardRequest, response: pb.ForwardResponse) -> None:
        """Run ``request`` and write its outputs into ``response``."""
        rt = self._ready()
        steps, inputs = _validate(rt, request)
        if rt.cfg.delay_ms:  # fault injection: a slow machine
            await asyncio.sleep(rt.cfg.delay_ms / 1000)
        layer, branches = request.layer, request.branches
        results: list[BranchResult | BaseException]
        if len(branches) == 1:  # the usual case: no task to gather (a failure raises as below)
            results = [await rt.batchers[(layer, branches[0])].submit(steps, inputs)]
        else:
            jobs = [rt.batchers[(layer, b)].submit(steps, inputs) for b in branches]
            results = await asyncio.gather(*jobs, return_exceptions=True)
        done = [r for r in results if isinstance(r, BranchResult)]
        if len(done) != len(results):
            raise next(r for r in results if isinstance(r, BaseException))
        for b, result in zip(branches, done, strict=True):
            encode_into(
                response.outputs.add(branch=b).outputs, corrupt(rt.cfg.test_fault, result.outputs)
            )
        response.compute_seconds = max(r.compute_seconds for r in done)

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        try:
            rt = self._ready()
        except StatusError as err:
            await context.abort(err.code, err.details)
        return pb.EndSessionResponse(released_caches=rt.store.end(request.session_id))


def _call_error(err: StatusError) -> pb.CallError:
    error = pb.CallError(code=err.code.value[0], details=err.details)
    for key, value in err.metadata:
        if key == CACHE_LENGTH_METADATA:
            error.cache_length = int(value)
    return error


def _invalid(details: str) -> StatusError:
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT, details)


def _validate(rt: NodeRuntime, request: pb.ForwardRequest) -> tuple[list[Step], torch.Tensor]:
    """Every check that needs no cache: served branches, steps, tensor dtype/shape/values."""
    lim, cfg = rt.cfg.limits, rt.manifest.config
    layer, branches, wire_steps = request.layer, request.branches, request.steps
    if not branches:
        raise _invalid("no branches requested")
    if len(branches) > 1 and len(set(branches)) != len(branches):
        raise _invalid("a branch is requested twice")
    missing = [b for b in branches if (layer, b) not in rt.branches]
    if missing:
        raise StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"layer {layer} branch {missing[0]} is not served by this node "
            f"(it serves {format_branches(tuple(sorted(rt.branches)))})",
        )
    if not wire_steps:
        raise _invalid("no session steps given")
    if len(wire_steps) > lim.max_steps_per_call:
        raise _invalid(f"{len(wire_steps)} steps exceed the limit of {lim.max_steps_per_call}")
    steps = [Step(s.session_id, s.start, s.length) for s in wire_steps]
    if len(steps) > 1 and len({s.session_id for s in steps}) != len(steps):
        raise _invalid("a session appears twice in one call")
    for s in steps:
        if not s.session_id or len(s.session_id) > MAX_SESSION_ID:
            raise _invalid(f"session ids must have 1..{MAX_SESSION_ID} characters")
        if s.length == 0:
            raise _invalid(f"session {s.session_id}: step length must be positive")
    total = sum(s.length for s in steps)
    if total > lim.max_tokens_per_call:
        raise _invalid(f"{total} positions exceed the limit of {lim.max_tokens_per_call} per call")
    try:
        x = decode(request.inputs, max_elements=lim.max_tokens_per_call * cfg.d_model)
    except CodecError as exc:
        raise _invalid(f"inputs: {exc}") from exc
    if x.dtype != rt.dtype:
        raise _invalid(f"inputs are {x.dtype}, this node computes in {rt.dtype}")
    if x.dim() != 2 or x.shape[1] != cfg.d_model:
        raise _invalid(f"inputs must have shape (positions, {cfg.d_model}), got {tuple(x.shape)}")
    if x.shape[0] != total:
        raise _invalid(f"inputs hold {x.shape[0]} positions, the steps add up to {total}")
    # A finite sum proves every value finite (NaN and Inf propagate) in one cheap op; only a
    # non-finite sum, NaN/Inf or a float overflow of huge values, needs the exact check.
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise _invalid("inputs contain NaN or Inf")
    return steps, x if rt.cfg.device == "cpu" else x.to(rt.cfg.device)
