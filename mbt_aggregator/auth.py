"""Who may call the gateway: its server credentials and the API guards (``--api-auth``).

- ``cert`` (the default with TLS): the handshake demands a certificate from the cluster CA and
  the guard accepts only those issued for the client or aggregator role, not a node's;
- ``token``: every call carries ``authorization: Bearer <token>`` metadata, compared in
  constant time; with TLS the channel is encrypted but no client certificate is asked for;
- ``none``: anyone who reaches the port (a trusted LAN).

Health checks pass every guard, so probes need no token (with ``cert`` the handshake still
needs a cluster certificate: any role will do).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from mbt_core.trust.certs import TlsMaterial
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
