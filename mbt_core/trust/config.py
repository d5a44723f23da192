"""Trust and TLS settings of a process, and bearer tokens: paths and checks only.

The gRPC credentials are built from these in :mod:`mbt_core.wire`, ``mbt_node`` and
``mbt_aggregator``; nothing here knows gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mbt_core.errors import CertificateError
from mbt_core.fileio import read_capped
from mbt_core.trust.certs import (
    MAX_PEM_BYTES,
    TlsMaterial,
    certificate_role,
    load_tls_material,
    public_key_fingerprint,
)
from mbt_core.trust.root import STATE_FILE as ROOTS_STATE_FILE
from mbt_core.trust.root import resolve_trust_root

if TYPE_CHECKING:
    from mbt_core.trust.root import Trust


MAX_TOKEN_BYTES = 4096


MIN_TOKEN_CHARS = 16  # a short token could be guessed by anyone on the LAN


@dataclass(frozen=True)
class TrustConfig:
    """PEM public keys with a threshold, or a pinned trust root and its rotations (`mbt trust`).

    A root's own threshold is a floor that ``threshold`` may only raise.
    """

    keys: tuple[Path, ...] = ()
    threshold: int = 1
    root: Path | None = None
    root_updates: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.keys and self.root is not None:
            raise ValueError("give either --trusted-key or --root, not both")
        if not self.keys and self.root is None:
            raise ValueError("give --trusted-key (one or more) or --root to verify the manifest")
        if self.root_updates and self.root is None:
            raise ValueError("--root-update needs the pinned --root it rotates from")

    def resolve(self, state_file: Path | None = None) -> Trust:
        """The keys, or the root in force after the updates (raises TrustRootError).

        Accepted roots are recorded next to ``state_file`` (the rollback state), so that a
        restart with only the pinned root still trusts the rotated one.
        """
        if self.root is None:
            return list(self.keys)
        roots_state = None if state_file is None else Path(state_file).parent / ROOTS_STATE_FILE
        return resolve_trust_root(self.root, self.root_updates, roots_state)


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate and key and the cluster CA (`mbt certs`); none: plaintext.

    A server needs all three. A gateway client may give only the CA (token auth over TLS).
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.cert is not None and self.ca is None:
            raise ValueError("--tls-cert needs --tls-ca (the cluster CA certificate)")

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def load(self, role: str | None = None) -> TlsMaterial:
        """Certificate, key and CA, checked against each other; with ``role``, the role the
        certificate must have been issued for (``mbt certs issue --role``)."""
        if self.cert is None or self.key is None or self.ca is None:
            raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        material = load_tls_material(self.cert, self.key, self.ca)
        held = certificate_role(material.cert_pem)
        if role is not None and held != role:
            raise CertificateError(
                f"{self.cert}: is a {held or 'role-less'} certificate; this process needs one "
                f"issued with --role {role}"
            )
        return material

    def ca_pem(self) -> bytes:
        """The CA certificate alone (a client that only verifies the server)."""
        if self.ca is None:
            raise ValueError("no --tls-ca given")
        try:
            pem = read_capped(self.ca, MAX_PEM_BYTES)
        except (OSError, ValueError) as exc:
            raise CertificateError(f"{self.ca}: cannot read the CA certificate ({exc})") from exc
        public_key_fingerprint(pem)  # a clear error for a file that is not a certificate
        return pem


def check_transport(tls: TlsConfig, insecure: bool) -> None:
    """Secure by default: a server runs mutual TLS unless the operator says ``--insecure``."""
    if tls.enabled and insecure:
        raise ValueError("--insecure and --tls-cert/--tls-key/--tls-ca exclude each other")
    if not tls.enabled and not insecure:
        raise ValueError(
            "no TLS: give --tls-cert, --tls-key and --tls-ca (make them with `mbt certs init` "
            "and `mbt certs issue`), or --insecure to run plaintext on a network you trust"
        )


def read_token(path: Path) -> str:
    """A bearer token from a file, surrounding whitespace dropped; printable ASCII only."""
    try:
        data = read_capped(path, MAX_TOKEN_BYTES)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the token ({exc.strerror})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: not a token file ({exc})") from exc
    token = data.strip()
    if not token.isascii() or not all(33 <= c < 127 for c in token):
        raise ValueError(f"{path}: a token is printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{path}: a token needs at least {MIN_TOKEN_CHARS} characters")
    return token.decode("ascii")
