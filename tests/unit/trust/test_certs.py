"""Cluster CA and certificates: issue, node-id fingerprints, chain checks, and a real mTLS call."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mbt_core.cli.main import main
from mbt_core.errors import CertificateError
from mbt_core.trust.certs import (
    Issued,
    certificate_role,
    init_ca,
    issue_cert,
    load_tls_material,
    node_id_hostname,
    public_key_fingerprint,
    verify_certificate,
)


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture()
def other_ca(tmp_path: Path) -> Path:
    init_ca(tmp_path / "other-ca")
    return tmp_path / "other-ca"


def issue(ca: Path, name: str, **kwargs: object) -> Issued:
    return issue_cert(ca, name, ca.parent / "certs", **kwargs)  # type: ignore[arg-type]


def spki_sha256(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def test_issued_certificate_has_sans_eku_role_and_private_keys_0600(ca: Path) -> None:
    old = os.umask(0)  # a permissive umask must not widen the private keys' mode
    try:
        node = issue(ca, "node0", sans=["10.0.0.7", "node0.lan"])
    finally:
        os.umask(old)
    assert node.key_path.stat().st_mode & 0o777 == 0o600
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(node.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert san.get_values_for_type(x509.DNSName) == [
        "node0.lan",
        node_id_hostname(node.fingerprint),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert certificate_role(node.cert_path.read_bytes()) == "node"
    client = issue(ca, "ops", role="client")
    client_cert = x509.load_pem_x509_certificate(client.cert_path.read_bytes())
    client_eku = client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    default = issue(ca, "plain")
    default_san = x509.load_pem_x509_certificate(default.cert_path.read_bytes()).extensions
    names = default_san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName)[0] == "localhost"


def test_fingerprint_is_spki_sha256_and_stable(ca: Path) -> None:
    node = issue(ca, "node0")
    pem = node.cert_path.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert node.fingerprint == spki_sha256(node.cert_path)
    assert public_key_fingerprint(pem) == public_key_fingerprint(der) == node.fingerprint
    material = load_tls_material(node.cert_path, node.key_path, ca / "ca.crt")
    assert material.fingerprint == node.fingerprint
    assert material.cert_pem == pem and material.ca_pem == (ca / "ca.crt").read_bytes()
    renewed = issue(ca, "node0", renew=True)  # same key, new certificate: same node id
    assert renewed.cert_path.read_bytes() != pem
    assert renewed.fingerprint == spki_sha256(renewed.cert_path) == node.fingerprint
    other = issue(ca, "node1")
    assert other.fingerprint != node.fingerprint


def test_certificate_from_another_ca_is_refused(ca: Path, other_ca: Path) -> None:
    foreign = issue_cert(other_ca, "intruder", other_ca.parent / "foreign")
    with pytest.raises(CertificateError, match=r"not (issued|signed) by CA"):
        load_tls_material(foreign.cert_path, foreign.key_path, ca / "ca.crt")
    with pytest.raises(CertificateError):
        verify_certificate(foreign.cert_path.read_bytes(), (ca / "ca.crt").read_bytes())
    own = issue(ca, "node0")
    assert verify_certificate(own.cert_path.read_bytes(), (ca / "ca.crt").read_bytes()) == (
        own.fingerprint
    )


def test_a_leaf_is_not_accepted_as_a_ca(ca: Path) -> None:
    node, other = issue(ca, "node0"), issue(ca, "node1")
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        verify_certificate(other.cert_path.read_bytes(), node.cert_path.read_bytes())


def test_expired_and_not_yet_valid_certificates_are_refused(ca: Path) -> None:
    old = issue(ca, "old", days=1, now=datetime.now(UTC) - timedelta(days=3))
    with pytest.raises(CertificateError, match=r"'old' is valid from .* not now"):
        load_tls_material(old.cert_path, old.key_path, ca / "ca.crt")
    fresh = issue(ca, "fresh")
    later = datetime.now(UTC) + timedelta(days=400)
    with pytest.raises(CertificateError, match="not now"):
        load_tls_material(fresh.cert_path, fresh.key_path, ca / "ca.crt", now=later)


def test_mismatched_key_garbage_and_oversized_files_are_clear_errors(
    ca: Path, tmp_path: Path
) -> None:
    a, b = issue(ca, "a"), issue(ca, "b")
    with pytest.raises(CertificateError, match=r"a\.key: is not the private key of .*b\.crt"):
        load_tls_material(b.cert_path, a.key_path, ca / "ca.crt")
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match=r"junk\.crt: not a readable X\.509 certificate"):
        load_tls_material(junk, a.key_path, ca / "ca.crt")
    huge = tmp_path / "huge.crt"
    huge.write_bytes(b"x" * (1024 * 1024))
    with pytest.raises(CertificateError, match=r"huge\.crt: larger than"):
        load_tls_material(huge, a.key_path, ca / "ca.crt")
    with pytest.raises(CertificateError, match=r"missing\.key: cannot read"):
        load_tls_material(a.cert_path, tmp_path / "missing.key", ca / "ca.crt")


def test_existing_key_is_never_overwritten(ca: Path) -> None:
    node = issue(ca, "node0")
    before = node.key_path.read_bytes(), node.cert_path.read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        issue(ca, "node0")
    with pytest.raises(CertificateError, match="already exists"):
        init_ca(ca)
    assert (node.key_path.read_bytes(), node.cert_path.read_bytes()) == before


# --- a real mutual-TLS gRPC call: the certificates work with gRPC's TLS stack ---------------

_METHOD = "/mbt.test.Echo/Peer"


@pytest.fixture()
def tls_server(ca: Path) -> Iterator[tuple[int, Issued, list[str]]]:
    """A server with a node certificate that requires a client certificate from ``ca``;
    it answers with the fingerprint of the client certificate it saw."""
    node = issue(ca, "node0")
    material = load_tls_material(node.cert_path, node.key_path, ca / "ca.crt")
    seen: list[str] = []

    def peer(_request: bytes, context: grpc.ServicerContext) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        seen.append(public_key_fingerprint(pem))
        return seen[-1].encode()

    handler = grpc.method_handlers_generic_handler(
        "mbt.test.Echo", {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_pem)],
        root_certificates=material.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, node, seen
    finally:
        server.stop(None)


def call(port: int, client: Issued, ca_cert: Path, target_name: str | None = None) -> str:
    material = load_tls_material(client.cert_path, client.key_path, ca_cert)
    credentials = grpc.ssl_channel_credentials(material.ca_pem, material.key_pem, material.cert_pem)
    options = [] if target_name is None else [("grpc.ssl_target_name_override", target_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        return channel.unary_unary(_METHOD)(b"", timeout=10).decode()


def test_mutual_tls_call_with_cluster_certificates(
    tls_server: tuple[int, Issued, list[str]], ca: Path
) -> None:
    port, node, seen = tls_server
    gateway = issue(ca, "gateway", role="aggregator")
    assert call(port, gateway, ca / "ca.crt") == gateway.fingerprint
    assert seen == [gateway.fingerprint]  # the server learns the client's node id from TLS
    # A client expecting this node's id (from a roster or TXT record) pins it by name.
    assert call(port, gateway, ca / "ca.crt", node_id_hostname(node.fingerprint))


def test_mutual_tls_refuses_wrong_ca_and_wrong_node_id(
    tls_server: tuple[int, Issued, list[str]], ca: Path, other_ca: Path
) -> None:
    port, _node, seen = tls_server
    intruder = issue_cert(other_ca, "intruder", other_ca.parent / "foreign", role="aggregator")
    with pytest.raises(grpc.RpcError) as err:
        call(port, intruder, other_ca / "ca.crt")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    gateway = issue(ca, "gateway", role="aggregator")
    impostor_id = issue(ca, "node1").fingerprint  # valid, but not the node listening here
    with pytest.raises(grpc.RpcError) as err:
        call(port, gateway, ca / "ca.crt", node_id_hostname(impostor_id))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_cli_certs_init_issue_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, out = tmp_path / "ca", tmp_path / "certs"
    assert main(["certs", "init", "--out", str(ca)]) == 0
    args = ["certs", "issue", "--ca", str(ca), "--name", "n0", "--out", str(out)]
    assert main([*args, "--san", "127.0.0.1,::1,n0.local"]) == 0
    printed = capsys.readouterr().out
    node_id = spki_sha256(out / "n0.crt")
    assert f"node id: {node_id}" in printed
    assert main(["certs", "fingerprint", str(out / "n0.crt")]) == 0
    assert capsys.readouterr().out.strip() == node_id
    assert main([*args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbt certs: error:") and "already exists" in err[0]
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--san", "bad name!"]) == 2
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err
