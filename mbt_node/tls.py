"""Mutual TLS of a node: server credentials, and a guard that answers only the gateway.

With TLS the handshake already refuses anyone without a certificate from the cluster CA. The
guard narrows that to certificates issued for the aggregator role, so that a client or another
node holding a cluster certificate cannot call ``Forward`` or ``Describe`` directly. Health
checks stay open to any cluster certificate: a probe needs a certificate, but only a client one.
"""

from __future__ import annotations

import grpc

from mbt_core.trust.certs import TlsMaterial
from mbt_core.wire.server import Guard, role_check

CALLER_ROLES = frozenset({"aggregator"})


def server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """This node's certificate; callers must present one signed by the cluster CA."""
    return grpc.ssl_server_credentials(
        ((material.key_pem, material.cert_pem),),
        root_certificates=material.ca_pem,
        require_client_auth=True,
    )


def caller_guard(roles: frozenset[str] = CALLER_ROLES) -> Guard:
    """PERMISSION_DENIED for a caller whose certificate was not issued for ``roles``."""
    return Guard(role_check(roles, "call a node"))
