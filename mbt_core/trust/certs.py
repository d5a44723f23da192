"""Cluster TLS: a private CA, certificates for nodes, gateways and clients, and node ids.

Every gRPC connection of a cluster is mutual TLS against one cluster CA. Keys are ECDSA P-256:
gRPC's TLS stack (BoringSSL) handles P-256 certificates everywhere, Ed25519 ones not reliably.

A node's id is the SHA-256 of its certificate's SubjectPublicKeyInfo (DER). It survives a
renewed certificate for the same key, and it is proven by the TLS handshake itself, so an mDNS
TXT record cannot claim another node's id. For the side that cannot read the peer certificate
(a gRPC client), every certificate also names its id as a DNS SAN (:func:`node_id_hostname`):
a client that expects node X connects with ``grpc.ssl_target_name_override`` set to that name,
and the handshake fails unless the server holds a CA-signed certificate for X.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mbt_core.errors import CertificateError
from mbt_core.fileio import atomic_write_bytes, create_new_bytes, read_capped

CA_CERT, CA_KEY = "ca.crt", "ca.key"
ROLES = ("node", "aggregator", "client")
DEFAULT_SANS = ("127.0.0.1", "localhost")
MAX_PEM_BYTES = 64 * 1024  # a certificate or key is ~1 KiB
CLOCK_SKEW = timedelta(minutes=5)  # certificates start this early, for peers whose clocks lag
_ID_DOMAIN = "id.mbt"
_DNS_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}")
_EKU = {
    "node": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "aggregator": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],  # a client never serves
}


@dataclass(frozen=True)
class Issued:
    cert_path: Path
    key_path: Path
    fingerprint: str  # the node id


class TlsMaterial(NamedTuple):
    """PEM bytes for ``grpc.ssl_server_credentials`` / ``grpc.ssl_channel_credentials``."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.cert_pem)


def init_ca(
    out_dir: Path,
    *,
    common_name: str = "mbt cluster CA",
    days: int = 3650,
    now: datetime | None = None,
) -> Issued:
    """Write ``ca.crt`` and ``ca.key`` (mode 0600) into ``out_dir``; never overwrite."""
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_existing(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _base(name, name, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    )
    cert = builder.sign(key, hashes.SHA256())
    _write_pair(cert_path, key_path, cert, key, replace_cert=False)
    return Issued(cert_path, key_path, public_key_fingerprint(_pem(cert)))


def issue_cert(
    ca_dir: Path,
    name: str,
    out_dir: Path,
    *,
    role: str = "node",
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
    renew: bool = False,
    now: datetime | None = None,
) -> Issued:
    """Write ``NAME.crt`` and ``NAME.key`` (0600), signed by the CA in ``ca_dir``.

    ``sans`` are IP addresses or DNS names the holder serves at; the id name is always added.
    With ``renew``, the existing ``NAME.key`` is kept (the node id does not change) and only
    the certificate is replaced.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError(f"certificate name {name!r} must be a plain file name stem")
    out = Path(out_dir)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    ca_cert = _load_cert(Path(ca_dir) / CA_CERT)
    ca_key = _load_key(Path(ca_dir) / CA_KEY)
    if renew:
        key = _load_key(key_path)
    else:
        _refuse_existing(cert_path, key_path)
        key = ec.generate_private_key(ec.SECP256R1())
    fingerprint = _spki_sha256(key.public_key())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    alt_names = [*parse_sans(sans), x509.DNSName(node_id_hostname(fingerprint))]
    cert = (
        _base(subject, ca_cert.subject, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_EKU[role]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key, replace_cert=renew)
    return Issued(cert_path, key_path, fingerprint)


def load_tls_material(
    cert: Path, key: Path, ca: Path, *, now: datetime | None = None
) -> TlsMaterial:
    """Read a certificate, its private key and the CA; raise :class:`CertificateError` unless
    the key matches the certificate and the CA signed it and both are within their validity."""
    cert_pem, key_pem, ca_pem = (_read_pem(p) for p in (cert, key, ca))
    leaf = _parse_cert(cert_pem, cert)
    private = _parse_key(key_pem, key)
    if _spki_sha256(private.public_key()) != _spki_sha256(leaf.public_key()):
        raise CertificateError(f"{key}: is not the private key of {cert}")
    verify_certificate(cert_pem, ca_pem, now=now)
    return TlsMaterial(cert_pem, key_pem, ca_pem)


def verify_certificate(cert_pem: bytes, ca_pem: bytes, *, now: datetime | None = None) -> str:
    """The certificate's fingerprint once the CA signed it and both are valid at ``now``."""
    cert, ca = _parse_cert(cert_pem, "certificate"), _parse_cert(ca_pem, "CA certificate")
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"CA certificate {_cn(ca)!r} is not a CA certificate")
    if cert.issuer != ca.subject:
        raise CertificateError(f"certificate {_cn(cert)!r} was not issued by CA {_cn(ca)!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            f"certificate {_cn(cert)!r} is not signed by CA {_cn(ca)!r} "
            f"({str(exc) or 'bad signature'})"
        ) from exc
    now = now or datetime.now(UTC)
    for what, c in (("certificate", cert), ("CA certificate", ca)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise CertificateError(
                f"{what} {_cn(c)!r} is valid from {c.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                f"to {c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not now"
            )
    return _spki_sha256(cert.public_key())


def public_key_fingerprint(cert: bytes) -> str:
    """SHA-256 hex of the certificate's SubjectPublicKeyInfo (PEM or DER): the node id."""
    return _spki_sha256(_parse_cert(cert, "certificate").public_key())


def certificate_file_fingerprint(path: Path) -> str:
    """The node id of the certificate file at ``path`` (PEM or DER)."""
    return _spki_sha256(_load_cert(Path(path)).public_key())


def certificate_role(cert: bytes) -> str | None:
    """The role ``issue_cert`` wrote (node, aggregator or client), or None."""
    values = _parse_cert(cert, "certificate").subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME
    )
    role = values[0].value if values else None
    return role if role in ROLES else None


def node_id_hostname(node_id: str) -> str:
    """The DNS name a certificate for ``node_id`` carries (two 32-digit labels: a DNS label
    holds at most 63 characters)."""
    if not re.fullmatch(r"[0-9a-f]{64}", node_id):
        raise ValueError(f"node id {node_id!r} is not 64 lowercase hex digits")
    return f"{node_id[:32]}.{node_id[32:]}.{_ID_DOMAIN}"


def parse_sans(items: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, anything else as a DNS name (checked)."""
    names: list[x509.GeneralName] = []
    for item in (s.strip() for s in items):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.fullmatch(item):
            raise ValueError(f"SAN {item!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(item))
    return names


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    now: datetime | None,
) -> x509.CertificateBuilder:
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    start = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """Only the usages named; every other flag off."""
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    return x509.KeyUsage(**(flags | allowed))


def _write_pair(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    replace_cert: bool,
) -> None:
    """Key first (0600, never replaced), then the certificate, each written atomically."""
    if not replace_cert:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            create_new_bytes(key_path, key_pem, 0o600)
        except FileExistsError:
            raise CertificateError(f"{key_path}: already exists; refusing to overwrite") from None
    atomic_write_bytes(cert_path, _pem(cert), 0o644)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertificateError(
                f"{path}: already exists; refusing to overwrite (use a new name or folder)"
            )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki_sha256(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _cn(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else cert.subject.rfc4514_string()


def _read_pem(path: Path) -> bytes:
    try:
        return read_capped(path, MAX_PEM_BYTES)
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise CertificateError(f"{path}: {exc}, not a PEM file") from exc


def _load_cert(path: Path) -> x509.Certificate:
    return _parse_cert(_read_pem(path), path)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return _parse_key(_read_pem(path), path)


def _parse_cert(data: bytes, source: object) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{source}: not a readable X.509 certificate ({exc})") from exc


def _parse_key(data: bytes, source: object) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{source}: not a readable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertificateError(f"{source}: not an ECDSA P-256 private key")
    return key
