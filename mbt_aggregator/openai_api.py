"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Starlette rather than FastAPI: three routes whose bodies are checked here field by field and
answered in OpenAI's error shape; pydantic models would add a second set of validation
messages to translate. Every generation goes to the same
:class:`~mbt_aggregator.generation.Gateway` the gRPC servicer calls: its limits, sampling checks
(their messages become the 400s), metrics and decoding loop. Only what HTTP adds is checked
here: JSON types, ``n``, ``stop``, the model name, the body size, the caller (the same guard
rules and per-client slots as gRPC, :class:`~mbt_aggregator.auth.HttpGuard`).

OpenAI's defaults where the gateway's differ: ``temperature`` 1, ``max_tokens`` 16 for
completions (the gateway's default for chat), and a random seed unless one is given. Every
token's branch report (what the gRPC API sends per token) rides in the extension field
``mbt``: per streamed chunk, and as ``mbt.tokens`` in a whole response.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from mbt_aggregator.auth import HttpGuard
from mbt_aggregator.chat import ChatTemplate, Message
from mbt_aggregator.config import GatewayLimits
from mbt_aggregator.generation import Gateway, GenerateRequest, TextEvent, read_ahead
from mbt_aggregator.reports import LayerReport
from mbt_core.errors import InvalidRequest, MbtError, QuorumNotReached
from mbt_core.wire.server import ClientSlots, identity

log = logging.getLogger("mbt_aggregator.http")
MAX_BODY_BYTES = 4 << 20  # what gRPC receives at most by default
EVENTS_AHEAD = 4  # tokens a generation may run ahead of its client's stream
COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS, MAX_STOP_CHARS = 4, 256
# Fields whose features this API lacks: refused when set, rather than silently ignored.
UNSUPPORTED = ("echo", "logprobs", "top_logprobs", "suffix", "tools", "functions", "logit_bias")
# The errors a request may end with, as (status, type, code); anything else is a 500.
TOLD: dict[type[MbtError], tuple[int, str, str | None]] = {
    InvalidRequest: (400, "invalid_request_error", None),
    QuorumNotReached: (503, "server_error", "no_quorum"),
}
_TOLD = tuple(TOLD)


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}

    @classmethod
    def of(cls, exc: MbtError) -> ApiError:
        status, type_, code = next(TOLD[c] for c in type(exc).__mro__ if c in TOLD)
        return cls(status, str(exc), type_, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def _internal(exc: BaseException) -> ApiError:
    log.error("request failed", exc_info=exc)
    return ApiError(500, "internal error of the gateway (logged)", "server_error")


@dataclass(frozen=True)
class ServedModel:
    id: str  # the manifest's model id, as the gRPC Status reports it
    created: int  # the export's time, Unix seconds


@dataclass(frozen=True)
class Ask:
    """A checked request: what to generate and how to answer."""

    request: GenerateRequest
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    chat: bool


class StopCut:
    """Generated text cut at the first stop string. While the text ends in what may begin a
    stop string, that tail is held back, so a stream never sends text that a stop removes."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that may go out now, with ``piece`` added."""
        self.text += piece
        found = [
            i for s in self.stops if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0
        ]
        if found:
            self.hit, end = True, min(found)
        else:
            held = max(
                (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                default=0,
            )
            end = max(self.sent, len(self.text) - held)
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """What was held back, once the generation ended without reaching a stop."""
        out = "" if self.hit else self.text[self.sent :]
        self.sent += len(out)
        return out

    @property
    def result(self) -> str:
        return self.text[: self.sent]


@lru_cache(maxsize=1024)
def _layer(report: LayerReport) -> dict[str, Any]:
    """A layer's report in the gRPC API's vocabulary (``LayerInfo``); the generations of one
    batch share theirs, so it is cached (and never changed)."""
    return {
        "layer": report.layer,
        "latency_ms": round(report.latency_s * 1e3, 3),
        "lost_weight": round(max(0.0, report.lost_weight), 6),  # 1 - the weight mass used
        "branches": [
            {
                "branch": b.branch,
                "outcome": b.outcome,
                "node_id": b.node_id,
                "hedged": b.hedged,
                "latency_ms": round(b.latency_s * 1e3, 3),
            }
            for b in report.branches
        ],
    }


def token_report(event: TextEvent) -> dict[str, Any]:
    """What every layer's branches did for one token (the ``mbt`` extension field)."""
    return {
        "index": event.index,
        "token_id": event.token,
        "latency_ms": round(event.seconds * 1e3, 3),
        "layers": [_layer(r) for r in event.layers],
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Lease:
    """A running request's place under the limits; given back once, however it ends."""

    def __init__(self, api: OpenAiApi, client: str) -> None:
        self._api, self._client, self._held = api, client, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._api.running -= 1
            self._api.slots.give_back(self._client)


class _EventStream(StreamingResponse):
    """Server-sent events whose ``cleanup`` runs however the response ends (also when the
    client leaves before the stream started)."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], Any]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class OpenAiApi:
    """The routes, over one :class:`Gateway`."""

    def __init__(
        self,
        gateway: Gateway,
        model: ServedModel,
        template: ChatTemplate,
        guard: HttpGuard,
        slots: ClientSlots,
        limits: GatewayLimits,
        peer_cert: Callable[[tuple[str, int] | None], bytes | None] = lambda _: None,
    ) -> None:
        self.gateway, self.model, self.template = gateway, model, template
        self.guard, self.slots, self.limits, self.peer_cert = guard, slots, limits, peer_cert
        self.running = 0  # generations in flight over HTTP (--max-concurrent-rpcs)

    def app(self, extra: Sequence[BaseRoute] = ()) -> Starlette:
        """The API's routes and ``extra`` ones (the web view), with OpenAI's errors for all."""

        async def refused(request: Request, exc: Exception) -> Response:
            if isinstance(exc, HTTPException):
                return ApiError(
                    exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"
                ).response()
            return _internal(exc).response()

        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                *extra,
            ],
            exception_handlers={HTTPException: refused, Exception: refused},
        )

    # -- routes ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            self.caller(request)
        except ApiError as exc:
            return exc.response()
        entry = {"id": self.model.id, "object": "model", "created": self.model.created}
        return JSONResponse({"object": "list", "data": [{**entry, "owned_by": "mbt"}]})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        lease = None
        try:
            client = self.caller(request)
            ask = self._ask(await _json(request), chat)
            lease = self._lease(client)
            if ask.stream:
                return await self._stream(ask, lease)
            return JSONResponse(await self._whole(ask, lease))
        except ApiError as exc:
            if lease is not None:
                lease.release()
            return exc.response()

    # -- the caller, the body -------------------------------------------------------------

    def caller(self, request: Request) -> str:
        """Who calls (as :func:`~mbt_core.wire.server.client_identity` names gRPC callers),
        once the guard let them in."""
        peer = (request.client.host, request.client.port) if request.client else None
        der = self.peer_cert(peer)
        authorization = request.headers.get("authorization", "")
        refusal = self.guard.check(authorization, der)
        if refusal is not None:
            kind = "invalid_request_error" if refusal.status == 401 else "permission_error"
            code = "invalid_api_key" if refusal.status == 401 else None
            raise ApiError(refusal.status, refusal.message, kind, code=code)
        host = peer[0] if peer else ""
        pem = ssl.DER_cert_to_PEM_cert(der).encode() if der else None
        return identity(
            pem, authorization or None, f"ipv6:[{host}]:" if ":" in host else f"ipv4:{host}:"
        )

    def _lease(self, client: str) -> _Lease:
        if self.running >= self.limits.max_concurrent_rpcs:
            raise ApiError(
                429,
                f"the gateway runs {self.running} requests, its limit; try again later",
                "rate_limit_error",
                code="rate_limit_exceeded",
            )
        if not self.slots.take(client):
            raise ApiError(429, self.slots.refusal, "rate_limit_error", code="rate_limit_exceeded")
        self.running += 1
        return _Lease(self, client)

    def _ask(self, body: dict[str, Any], chat: bool) -> Ask:
        model = _get(body, "model", str, "a string")
        if model is not None and model != self.model.id:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this gateway serves {self.model.id!r}",
                param="model",
                code="model_not_found",
            )
        for name in UNSUPPORTED:
            if body.get(name):
                raise ApiError(400, f"{name} is not supported by this gateway", param=name)
        if _get(body, "best_of", int, "an integer") not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if _get(body, "n", int, "an integer") not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if chat:
            prompt = self.template.render(_messages(body))
            wanted = _get(body, "max_completion_tokens", int, "an integer")
            wanted = _get(body, "max_tokens", int, "an integer") if wanted is None else wanted
        else:
            prompt = _prompt(body)
            wanted = _get(body, "max_tokens", int, "an integer")
            wanted = COMPLETION_TOKENS if wanted is None else wanted
        if wanted is not None and wanted < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {wanted}", param="max_tokens")
        temperature = _get(body, "temperature", float, "a number")
        seed = _get(body, "seed", int, "an integer")
        options = _get(body, "stream_options", dict, "an object") or {}
        stops = _stops(body) + (self.template.stop if chat else ())
        return Ask(
            GenerateRequest(
                prompt=prompt,
                max_new_tokens=wanted,
                temperature=1.0 if temperature is None else temperature,
                top_p=_get(body, "top_p", float, "a number"),
                seed=random.getrandbits(63) if seed is None else seed,
            ),
            stops=tuple(dict.fromkeys(stops)),
            stream=bool(_get(body, "stream", bool, "true or false")),
            include_usage=bool(options.get("include_usage")),
            chat=chat,
        )

    # -- answers ----------------------------------------------------------------------------

    def _finish(self, cut: StopCut, last: TextEvent | None) -> str:
        eos = last is not None and last.token == self.gateway.tokenizer.eos_id
        return "stop" if cut.hit or eos else "length"

    def _frame(self, ask: Ask, ident: str, created: int) -> dict[str, Any]:
        kind = "chat.completion" if ask.chat else "text_completion"
        return {"id": ident, "object": kind, "created": created, "model": self.model.id}

    async def _whole(self, ask: Ask, lease: _Lease) -> dict[str, Any]:
        cut, reports, last = StopCut(ask.stops), [], None
        try:
            async with contextlib.aclosing(self.gateway.generate(ask.request)) as events:
                async for last in events:
                    reports.append(token_report(last))
                    cut.feed(last.text)
                    if cut.hit:
                        break
        except _TOLD as exc:
            raise ApiError.of(exc) from exc
        except Exception as exc:
            raise _internal(exc) from exc
        finally:
            lease.release()
        cut.flush()
        ident = f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex}"
        finish = self._finish(cut, last)
        if ask.chat:
            message = {"role": "assistant", "content": cut.result}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": cut.result, "logprobs": None, "finish_reason": finish}
        return {
            **self._frame(ask, ident, int(time.time())),
            "choices": [choice],
            "usage": _usage(last, len(reports)),
            "mbt": {"tokens": reports},
        }

    async def _stream(self, ask: Ask, lease: _Lease) -> Response:
        """An event stream, once the first token is there: a request that fails before it
        (a limit, no quorum) still gets its HTTP status."""
        events = read_ahead(self.gateway.generate(ask.request), EVENTS_AHEAD)

        async def cleanup() -> None:
            await events.aclose()
            lease.release()

        try:
            first = await anext(events, None)
        except BaseException as exc:
            await cleanup()
            if isinstance(exc, _TOLD):
                raise ApiError.of(exc) from exc
            if isinstance(exc, Exception):
                raise _internal(exc) from exc
            raise
        return _EventStream(self._chunks(ask, first, events, cleanup), cleanup)

    async def _chunks(
        self,
        ask: Ask,
        first: TextEvent | None,
        events: AsyncGenerator[TextEvent, None],
        cleanup: Callable[[], Any],
    ) -> AsyncIterator[bytes]:
        frame = self._frame(
            ask, f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        )
        frame["object"] = "chat.completion.chunk" if ask.chat else "text_completion"
        if ask.include_usage:
            frame["usage"] = None

        def chunk(text: str | None, finish: str | None = None, **extra: Any) -> bytes:
            if ask.chat:  # the first delta names the role, the last has no content
                delta = {"role": "assistant"} if text == "" and not count else {}
                delta.update({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**frame, "choices": [choice], **extra})

        cut, count, last, error = StopCut(ask.stops), 0, first, None
        try:
            if ask.chat:
                yield chunk("")
            pending = [] if first is None else [first]
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    break
                count, last = count + 1, event
                yield chunk(cut.feed(event.text), None, mbt=token_report(event))
                if cut.hit:
                    break
        except _TOLD as exc:
            error = ApiError.of(exc)
        except Exception as exc:
            error = _internal(exc)
        finally:
            await cleanup()  # before the last chunks: a client may go on at [DONE]
        if error is not None:
            yield _sse(error.body)
        else:
            tail = cut.flush()
            yield chunk(tail or None, self._finish(cut, last))
            if ask.include_usage:
                yield _sse({**frame, "choices": [], "usage": _usage(last, count)})
        yield _sse("[DONE]")


def _usage(last: TextEvent | None, completion: int) -> dict[str, int]:
    prompt = last.prompt_tokens if last is not None else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, read up to :data:`MAX_BODY_BYTES`."""
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(part)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _get(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    """``body[name]`` if it is of ``kind`` (ints count as floats, booleans as nothing else),
    None when absent or null, else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ApiError(400, f"{name} must be {what}", param=name)
    return value


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(
            400, "prompt must be a string (token arrays and batches: no)", param="prompt"
        )
    return prompt


def _messages(body: dict[str, Any]) -> list[Message]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400, f"messages[{i}].role must be system, user or assistant", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", param="messages"
                )
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append(Message(role, content))
    return out


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ApiError(
            400,
            f"stop must be a string or a list of at most {MAX_STOPS} strings of 1.."
            f"{MAX_STOP_CHARS} characters",
            param="stop",
        )
    return tuple(stops)
