"""WHAT CROSSES THE NETWORK: the only part of the core that knows gRPC and protobuf.

``protocol`` is generated from ``proto/``; ``contract`` is the vocabulary node, gateway, client
and admission share; ``codec`` turns tensors into wire tensors (the one dtype table); ``server``
holds the interceptors and the health/reflection bootstrap; ``gateway_client`` is the blocking
client of the gateway API; ``discovery`` is the DNS-SD record. Only ``contract`` is re-exported
here, so that importing this package pulls in no gRPC.
"""

from mbt_core.wire.contract import (
    CACHE_LENGTH_METADATA,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    format_branches,
    parse_branches,
)

__all__ = [
    "CACHE_LENGTH_METADATA",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "format_branches",
    "parse_branches",
]
