"""The live web view at ``/`` of the gateway's HTTP server: a page, a script and a style sheet
served from the package (no build step, no libraries), and ``GET /mbt/swarm``, the swarm as
JSON (what ``mbt status --json`` prints: :func:`mbt_core.wire.swarm.swarm`).

The page asks ``/mbt/swarm`` every half second with ``fetch`` (not ``EventSource``, which
cannot send the bearer token of ``--api-auth token``) and streams a generation through
``/v1/completions``, colouring each token by the share of the layer weight that answered it.
The page itself holds no data and is served to anyone the TLS handshake lets in (so that a
token can be typed into it); the swarm and the generations are behind the API's guard.

Node ids and addresses come from nodes, so the script writes them as text, never as markup,
and the responses forbid inline scripts (``Content-Security-Policy``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from mbt_aggregator.openai_api import ApiError

FILES = {"view.js": "text/javascript", "view.css": "text/css"}  # what /web/ serves
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("mbt_aggregator").joinpath("web", name).read_bytes()


def routes(
    swarm: Callable[[], dict[str, Any]], caller: Callable[[Request], str]
) -> list[BaseRoute]:
    """The page and its files, and the swarm behind ``caller`` (the API's guard)."""
    page = _asset("index.html")
    files = {name: (_asset(name), kind) for name, kind in FILES.items()}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def asset(request: Request) -> Response:
        found = files.get(request.path_params["name"])
        if found is None:
            return ApiError(404, f"no such file: {request.url.path}").response()
        body, kind = found
        return Response(body, media_type=f"{kind}; charset=utf-8", headers=HEADERS)

    async def state(request: Request) -> Response:
        try:
            caller(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse(swarm(), headers={"Cache-Control": "no-store"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # rather than a 404 in the browser's console

    return [
        Route("/", index, methods=["GET"]),
        Route("/favicon.ico", no_icon, methods=["GET"]),
        Route("/web/{name}", asset, methods=["GET"]),
        Route("/mbt/swarm", state, methods=["GET"]),
    ]
