"""A small blocking client of the gateway, for the ``mbt generate/eval --gateway`` commands.

:class:`GatewayClient` knows several gateways (``--gateway A,B``) and fails over: a request
that finds a gateway unreachable (``UNAVAILABLE`` before its first answer) goes to the next
one, and the client keeps to the gateway that answered last. A request already under way is
not moved: its tokens so far came from one gateway's sessions.

Against a secured gateway it presents what ``--api-auth`` asks for: a client certificate
(``--tls-cert/--tls-key/--tls-ca``) or a bearer token (``--token-file``, over TLS with only
``--tls-ca``). The gateway's certificate is checked against the cluster CA and the address's
host name or IP (which its certificate must list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from mbt_core.errors import MbtError
from mbt_core.model.sampling import SamplingConfig
from mbt_core.trust.config import TlsConfig
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

T = TypeVar("T")


class GatewayError(MbtError):
    """The gateway refused or failed a request."""


@dataclass(frozen=True)
class Credentials:
    """What this client shows a secured gateway; the default: nothing, plaintext."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    token: str | None = None

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        if not self.tls.enabled:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self._channel_credentials(), options=list(options))

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, object]] = ()
    ) -> grpc.aio.Channel:
        """The same, for asyncio clients (benchmarks, the soak)."""
        if not self.tls.enabled:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self._channel_credentials(), list(options))

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        if self.tls.cert is None:
            return grpc.ssl_channel_credentials(self.tls.ca_pem())
        m = self.tls.load()
        return grpc.ssl_channel_credentials(m.ca_pem, m.key_pem, m.cert_pem)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)


def _error(address: str, exc: grpc.RpcError) -> GatewayError:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return GatewayError(f"gateway {address}: {code}: {details}")


def parse_gateways(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"HOST:PORT,HOST:PORT"`` (or a list of them) -> addresses, in order of preference."""
    parts = [text] if isinstance(text, str) else list(text)
    found = tuple(a.strip() for part in parts for a in part.split(",") if a.strip())
    if not found:
        raise ValueError("no gateway address given (HOST:PORT[,HOST:PORT...])")
    for address in found:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad gateway address {address!r}: expected HOST:PORT")
    return found


def _unreachable(exc: grpc.RpcError) -> bool:
    return hasattr(exc, "code") and exc.code() == grpc.StatusCode.UNAVAILABLE


class GatewayClient:
    """Generate, score and ask for status on the first gateway of ``addresses`` that answers."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        credentials: Credentials | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.addresses = parse_gateways(addresses)
        self.credentials = credentials or Credentials()
        self.timeout_s = timeout_s
        self._first = 0  # the gateway that answered last

    def _order(self) -> list[str]:
        n = len(self.addresses)
        return [self.addresses[(self._first + i) % n] for i in range(n)]

    def _failed_over(self, address: str, exc: grpc.RpcError, tried: list[str]) -> None:
        """Raise unless ``exc`` says the gateway is unreachable and another one is left."""
        tried.append(f"{address}: {exc.details() if hasattr(exc, 'details') else exc}")
        if not _unreachable(exc) or len(tried) == len(self.addresses):
            if len(tried) > 1:
                raise GatewayError("no gateway answered: " + "; ".join(tried)) from exc
            raise _error(address, exc) from exc

    def generate(self, prompt: str, cfg: SamplingConfig) -> Iterator[gw.GenerateEvent]:
        request = gw.GenerateRequest(
            prompt=prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k or 0,
            top_p=cfg.top_p or 0.0,
            seed=cfg.seed,
        )
        tried: list[str] = []
        for address in self._order():
            started = False
            with self.credentials.channel(address) as channel:
                stub = gw_grpc.GatewayServiceStub(channel)
                try:
                    for event in stub.Generate(
                        request, timeout=self.timeout_s, metadata=self.credentials.metadata
                    ):
                        if not started:
                            started = True
                            self._first = self.addresses.index(address)
                        yield event
                    return
                except grpc.RpcError as exc:
                    if started:  # under way: the answer so far is this gateway's
                        raise _error(address, exc) from exc
                    self._failed_over(address, exc, tried)

    def score(self, text: str, return_logprobs: bool = False) -> gw.ScoreResponse:
        request = gw.ScoreRequest(text=text, return_logprobs=return_logprobs)
        return self._unary(lambda stub: stub.Score, request, 256 << 20)

    def status(self) -> gw.StatusResponse:
        return self._unary(lambda stub: stub.Status, gw.StatusRequest())

    def _unary(
        self,
        method: Callable[[gw_grpc.GatewayServiceStub], Callable[..., T]],
        request: object,
        max_bytes: int = 4 << 20,
    ) -> T:
        tried: list[str] = []
        options = [("grpc.max_receive_message_length", max_bytes)]
        for address in self._order():
            with self.credentials.channel(address, options) as channel:
                call = method(gw_grpc.GatewayServiceStub(channel))
                try:
                    reply = call(
                        request, timeout=self.timeout_s, metadata=self.credentials.metadata
                    )
                except grpc.RpcError as exc:
                    self._failed_over(address, exc, tried)
                    continue
            self._first = self.addresses.index(address)
            return reply
        raise GatewayError("no gateway answered")  # unreachable: _failed_over raised


def generate_remote(
    address: str | Sequence[str],
    prompt: str,
    cfg: SamplingConfig,
    timeout_s: float = 600.0,
    credentials: Credentials | None = None,
) -> Iterator[gw.GenerateEvent]:
    """One generation on the first of ``address`` (``A,B``: fail over) that answers."""
    return GatewayClient(address, credentials, timeout_s).generate(prompt, cfg)


def score_remote(
    address: str | Sequence[str],
    text: str,
    timeout_s: float = 600.0,
    credentials: Credentials | None = None,
) -> gw.ScoreResponse:
    return GatewayClient(address, credentials, timeout_s).score(text)


def describe_layers(event: gw.GenerateEvent) -> str:
    """``L0: 1101 L1: 1h11`` per token: 1 used, 0 masked, x rejected, h hedged and used."""
    parts = []
    for layer in event.layers:
        marks = "".join(
            "x"
            if b.outcome == gw.OUTCOME_REJECTED
            else "0"
            if b.outcome != gw.OUTCOME_OK
            else "h"
            if b.hedged
            else "1"
            for b in layer.branches
        )
        parts.append(f"L{layer.layer}:{marks}")
    return " ".join(parts)
