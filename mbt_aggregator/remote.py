"""A small blocking client of the gateway, for the ``mbt generate/eval --gateway`` commands.

Against a secured gateway it presents what ``--api-auth`` asks for: a client certificate
(``--tls-cert/--tls-key/--tls-ca``) or a bearer token (``--token-file``, over TLS with only
``--tls-ca``). The gateway's certificate is checked against the cluster CA and the address's
host name or IP (which its certificate must list).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from mbt_core.errors import MbtError
from mbt_core.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.sampling import SamplingConfig
from mbt_core.service import TlsConfig, read_token, tls_config_from_args

OUTCOME_NAMES = {gw.OUTCOME_OK: "ok", gw.OUTCOME_MASKED: "masked", gw.OUTCOME_REJECTED: "rejected"}


class GatewayError(MbtError):
    """The gateway refused or failed a request."""


@dataclass(frozen=True)
class Credentials:
    """What this client shows a secured gateway; the default: nothing, plaintext."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    token: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        token = read_token(args.token_file) if args.token_file is not None else None
        return cls(tls_config_from_args(args), token)

    def channel(self, address: str) -> grpc.Channel:
        if not self.tls.enabled:
            return grpc.insecure_channel(address)
        if self.tls.cert is None:
            credentials = grpc.ssl_channel_credentials(self.tls.ca_pem())
        else:
            m = self.tls.load()
            credentials = grpc.ssl_channel_credentials(m.ca_pem, m.key_pem, m.cert_pem)
        return grpc.secure_channel(address, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)


def _error(address: str, exc: grpc.RpcError) -> GatewayError:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return GatewayError(f"gateway {address}: {code}: {details}")


def generate_remote(
    address: str,
    prompt: str,
    cfg: SamplingConfig,
    timeout_s: float = 600.0,
    credentials: Credentials | None = None,
) -> Iterator[gw.GenerateEvent]:
    request = gw.GenerateRequest(
        prompt=prompt,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or 0,
        top_p=cfg.top_p or 0.0,
        seed=cfg.seed,
    )
    creds = credentials or Credentials()
    with creds.channel(address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        try:
            yield from stub.Generate(request, timeout=timeout_s, metadata=creds.metadata)
        except grpc.RpcError as exc:
            raise _error(address, exc) from exc


def score_remote(
    address: str, text: str, timeout_s: float = 600.0, credentials: Credentials | None = None
) -> gw.ScoreResponse:
    creds = credentials or Credentials()
    with creds.channel(address) as channel:
        try:
            return gw_grpc.GatewayServiceStub(channel).Score(
                gw.ScoreRequest(text=text), timeout=timeout_s, metadata=creds.metadata
            )
        except grpc.RpcError as exc:
            raise _error(address, exc) from exc


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
