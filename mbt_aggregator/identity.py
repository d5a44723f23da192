"""Which node answers at an address: the node id its TLS certificate proves.

A TXT record or a peer list only says where to look, and ``Describe`` only says what the node
claims. Before the gateway calls a candidate it opens one TLS handshake of its own: the
cluster CA verifies the chain, the handshake proves the private key, and the SHA-256 of the
certificate's public key is the node id, whatever anyone claims. The gRPC channel then pins
that id by name (``grpc.ssl_target_name_override``, :func:`mbt_core.trust.certs.node_id_hostname`),
so the handshake of every later connection fails unless the same key answers.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from mbt_core.errors import MbtError
from mbt_core.trust.certs import TlsMaterial, certificate_role, public_key_fingerprint
from mbt_core.trust.config import TlsConfig


class IdentityError(MbtError):
    """A candidate could not show a node certificate of the cluster; ``reason`` for metrics."""

    def __init__(self, reason: str, details: str) -> None:
        super().__init__(details)
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class ClusterTls:
    """The gateway's certificate (role aggregator) for gRPC channels, and a TLS context for
    identity probes that verifies peers against the cluster CA only (no host names: a node
    proves an id, not an address)."""

    material: TlsMaterial
    probe: ssl.SSLContext

    @classmethod
    def load(cls, cfg: TlsConfig) -> ClusterTls:
        material = cfg.load(role="aggregator")
        probe = ssl.create_default_context(cadata=material.ca_pem.decode("ascii"))
        probe.check_hostname = False
        probe.load_cert_chain(str(cfg.cert), str(cfg.key))  # nodes demand a client certificate
        probe.set_alpn_protocols(["h2"])  # what a gRPC server expects to negotiate
        return cls(material, probe)


async def presented_node_id(address: str, tls: ClusterTls, timeout_s: float) -> str:
    """The node id of the certificate served at ``address``; raises :class:`IdentityError`
    (``unreachable``, ``tls`` for an untrusted certificate or no TLS, ``identity`` for a
    certificate not issued to a node)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, int(port), ssl=tls.probe)
    except ssl.SSLCertVerificationError as exc:
        raise IdentityError("tls", f"certificate not trusted: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        hint = ": a plaintext node?" if exc.reason == "WRONG_VERSION_NUMBER" else ""
        raise IdentityError("tls", f"TLS handshake failed ({exc.reason or exc}{hint})") from exc
    except (OSError, TimeoutError, ValueError) as exc:
        raise IdentityError("unreachable", f"cannot connect ({str(exc) or 'timed out'})") from exc
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()  # no TLS goodbye: a gRPC server may never answer one
    role = certificate_role(der)
    if role != "node":
        shown = role or "role-less"
        raise IdentityError("identity", f"presents a {shown} certificate, not a node's")
    return public_key_fingerprint(der)
