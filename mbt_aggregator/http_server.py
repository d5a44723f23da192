"""The gateway's HTTP server (``--http-listen``): uvicorn serving the OpenAI-compatible app
(:mod:`mbt_aggregator.openai_api`) in the gateway's own event loop.

Why in that loop and not beside it: the HTTP routes call the very :class:`Gateway` object the
gRPC servicer calls, and everything behind it (the engine's layer batches, the per-client
slots, the metrics, the sessions on the nodes) lives in this loop. A server in a thread or a
process of its own would need a bridge into the loop for every token, or a second gateway;
here a chat request and a gRPC stream fall into the same layer batches, and the one
``stop`` drains both. uvicorn is driven through ``startup``/``main_loop``/``shutdown``
rather than ``serve()``, which would put its own signal handlers over the gateway's drain.

TLS: with the gateway's TLS files the API is HTTPS with the same server certificate, and in
``--api-auth cert`` mode the handshake demands a client certificate of the cluster CA, as the
gRPC API's does. A connection's verified certificate is kept by its peer address for the
guard (:class:`~mbt_aggregator.auth.HttpGuard`), which checks its role per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from mbt_aggregator.config import split_host_port
from mbt_core.trust.config import TlsConfig

GRACE_S = 5.0  # in-flight requests get this long at a drain, as gRPC's server.stop(5.0)
Peer = tuple[str, int]


def bind(address: str) -> socket.socket:
    """The listening socket of ``address``, bound now: a taken port stops the start early."""
    host, port = split_host_port(address, "--http-listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"--http-listen: cannot listen on {address} ({exc.strerror})") from exc
    sock.setblocking(False)
    return sock


@dataclass
class PeerCertificates:
    """The verified client certificate (DER) of every open TLS connection, by peer address."""

    by_peer: dict[Peer, bytes] = field(default_factory=dict)

    def get(self, peer: Peer | None) -> bytes | None:
        return None if peer is None else self.by_peer.get(peer)

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's HTTP/1.1 protocol, noting each connection's certificate."""
        certs = self.by_peer

        class Protocol(H11Protocol):
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                tls = transport.get_extra_info("ssl_object")
                der = tls.getpeercert(binary_form=True) if tls is not None else None
                if der and self.client is not None:
                    certs[self.client] = der

            def connection_lost(self, exc: Exception | None) -> None:
                if self.client is not None:
                    certs.pop(self.client, None)
                super().connection_lost(exc)

            def shutdown(self) -> None:
                """At a drain, an idle keep-alive connection is dropped at once: closing it
                under TLS waits for the client's close_notify, which a client's idle pooled
                connection does not send (the drain would sit out its whole grace)."""
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.abort()
                else:
                    super().shutdown()

        return Protocol


class HttpServer:
    """uvicorn on a bound socket, started and stopped by the gateway."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        tls: TlsConfig | None,
        client_cert: bool,
        certs: PeerCertificates,
    ) -> None:
        config = uvicorn.Config(
            app,
            http=certs.protocol(),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(GRACE_S),
            ssl_certfile=None if tls is None else str(tls.cert),
            ssl_keyfile=None if tls is None else str(tls.key),
            ssl_ca_certs=None if tls is None else str(tls.ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_cert else ssl.CERT_NONE,
        )
        config.load()
        self._sock = sock
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticks: asyncio.Task[None] | None = None
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.root = f"{'https' if tls is not None else 'http'}://{host}:{port}/"  # the web view
        self.url = f"{self.root}v1"

    async def start(self) -> None:
        await self._server.startup(sockets=[self._sock])
        self._ticks = asyncio.create_task(self._server.main_loop())  # the Date header

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for :data:`GRACE_S`, then cancel."""
        self._server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        await self._server.shutdown(sockets=[self._sock])
