"""Who may call the gateway: its server credentials and the API guards (``--api-auth``).

- ``cert`` (the default with TLS): the handshake demands a certificate from the cluster CA and
  the guard accepts only those issued for the client or aggregator role, not a node's;
- ``token``: every call carries ``authorization: Bearer <token>`` metadata, compared in
  constant time; with TLS the channel is encrypted but no client certificate is asked for;
- ``none``: anyone who reaches the port (a trusted LAN).

Health checks pass every guard, so probes need no token (with ``cert`` the handshake still
needs a cluster certificate: any role will do).

:class:`HttpGuard` applies the same rules to the HTTP API (``--http-listen``), whose TLS
demands a client certificate in the same mode (:mod:`mbt_aggregator.http_server`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc

from mbt_core.errors import CertificateError
from mbt_core.trust.certs import TlsMaterial, certificate_role
from mbt_core.trust.config import read_token
from mbt_core.wire.server import Check, Guard, role_check

API_AUTH_MODES = ("none", "cert", "token")
CLIENT_ROLES = frozenset({"client", "aggregator"})


@dataclass(frozen=True)
class ApiAuth:
    mode: str = "none"
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in API_AUTH_MODES:
            raise ValueError(f"--api-auth must be one of {', '.join(API_AUTH_MODES)}")
        if (self.mode == "token") != (self.token_file is not None):
            raise ValueError("--api-auth token and --api-token-file go together")


def server_credentials(material: TlsMaterial, auth: ApiAuth) -> grpc.ServerCredentials:
    """The gateway's certificate; a client certificate is demanded in ``cert`` mode only."""
    return grpc.ssl_server_credentials(
        ((material.key_pem, material.cert_pem),),
        root_certificates=material.ca_pem,
        require_client_auth=auth.mode == "cert",
    )


def api_guards(auth: ApiAuth) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors that enforce ``auth`` (reads the token file now: errors at start)."""
    if auth.mode == "cert":
        return [
            Guard(role_check(CLIENT_ROLES, "use the gateway API (issue one with --role client)"))
        ]
    if auth.mode == "token" and auth.token_file is not None:
        return [Guard(token_check(read_token(auth.token_file)))]
    return []


def token_check(token: str) -> Check:
    expected = f"Bearer {token}".encode()

    async def check(context: grpc.aio.ServicerContext) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(str(given).encode(), expected):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this gateway needs 'authorization: Bearer <token>' (mbt generate --token-file)",
            )

    return check


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP: 401 (no or a wrong token) or 403 (a certificate of the wrong role)
    message: str


class HttpGuard:
    """``auth`` for HTTP requests: the gRPC guards' rules, given the ``Authorization`` header
    and the peer's verified certificate (DER; the TLS handshake already checked its chain)."""

    def __init__(self, auth: ApiAuth) -> None:
        self.mode = auth.mode
        token = read_token(auth.token_file) if auth.token_file is not None else None
        self._expected = None if token is None else f"Bearer {token}".encode()

    def check(self, authorization: str, cert_der: bytes | None) -> Refusal | None:
        if self._expected is not None:
            if not hmac.compare_digest(authorization.encode(), self._expected):
                return Refusal(401, "this gateway needs 'Authorization: Bearer <token>'")
        elif self.mode == "cert":
            role = _role(cert_der or b"")
            if role not in CLIENT_ROLES:
                return Refusal(
                    403,
                    f"a {role or 'role-less'} certificate may not use the gateway API; only "
                    f"{', '.join(sorted(CLIENT_ROLES))} certificates may (mbt certs issue "
                    "--role client)",
                )
        return None


@lru_cache(maxsize=256)
def _role(der: bytes) -> str | None:
    try:
        return certificate_role(der) if der else None
    except CertificateError:
        return None
