"""Security configuration and guards, in process: TLS and trust flags, bearer tokens, the
gateway's API guards, the node's caller guard, and the identity probe of admission."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mbt_aggregator import cli as aggregator_cli
from mbt_aggregator.auth import ApiAuth, token_check
from mbt_aggregator.client import node_channel
from mbt_aggregator.identity import ClusterTls, IdentityError, presented_node_id
from mbt_core.errors import CertificateError
from mbt_core.trust.certs import Issued, TlsMaterial, init_ca, issue_cert
from mbt_core.trust.config import TlsConfig, TrustConfig, read_token
from mbt_core.trust.root import create_root
from mbt_core.wire.server import Guard, role_check
from mbt_node import cli as node_cli
from mbt_node.tls import caller_guard
from mbt_node.tls import server_credentials as node_credentials

TOKEN = "a-long-enough-test-token"
_SERVICE = "mbt.test.Echo"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued | Path]:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    init_ca(root / "other")
    issued: dict[str, Issued | Path] = {
        name: issue_cert(root / "ca", name, root / "certs", role=role)
        for name, role in (("node", "node"), ("gateway", "aggregator"), ("client", "client"))
    }
    issued["foreign"] = issue_cert(root / "other", "foreign", root / "other-certs")
    issued["ca"] = root / "ca" / "ca.crt"
    issued["foreign_ca"] = root / "other" / "ca.crt"
    return issued


def _tls(pki: dict[str, Any], name: str, ca: str = "ca") -> TlsConfig:
    return TlsConfig(pki[name].cert_path, pki[name].key_path, pki[ca])


def _material(pki: dict[str, Any], name: str, ca: str = "ca") -> TlsMaterial:
    return _tls(pki, name, ca).load()


# --- flags and configuration --------------------------------------------------------------


def test_trust_config_needs_exactly_one_source(tmp_path: Path) -> None:
    key, root = tmp_path / "k.pem", tmp_path / "root.json"
    with pytest.raises(ValueError, match=r"give --trusted-key .* or --root"):
        TrustConfig()
    with pytest.raises(ValueError, match="either --trusted-key or --root, not both"):
        TrustConfig(keys=(key,), root=root)
    with pytest.raises(ValueError, match="--root-update needs the pinned --root"):
        TrustConfig(keys=(key,), root_updates=(root,))
    assert TrustConfig(keys=(key,)).resolve(tmp_path / "s.json") == [key]


def test_trust_root_state_is_kept_beside_the_rollback_state(tmp_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    root = create_root([signer.public_key()], 1, [signer])
    pinned = tmp_path / "root.json"
    pinned.write_bytes(root.document.to_json())
    resolved = TrustConfig(root=pinned).resolve(tmp_path / "state" / "accepted.json")
    assert resolved.digest == root.digest  # type: ignore[union-attr]


def test_tls_config_checks_its_files(pki: dict[str, Any], tmp_path: Path) -> None:
    node = pki["node"]
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        TlsConfig(cert=node.cert_path, ca=pki["ca"])
    with pytest.raises(ValueError, match="--tls-cert needs --tls-ca"):
        TlsConfig(node.cert_path, node.key_path)
    assert not TlsConfig().enabled and TlsConfig(ca=pki["ca"]).enabled
    with pytest.raises(ValueError, match="TLS needs all of"):
        TlsConfig(ca=pki["ca"]).load()
    assert _tls(pki, "node").load(role="node").fingerprint == node.fingerprint
    with pytest.raises(CertificateError, match=r"is a node certificate; .* --role aggregator"):
        _tls(pki, "node").load(role="aggregator")
    with pytest.raises(CertificateError, match=r"not (issued|signed) by CA"):
        _tls(pki, "foreign").load()
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(CertificateError, match=r"not a readable X\.509 certificate"):
        TlsConfig(ca=junk).ca_pem()
    assert TlsConfig(ca=pki["ca"]).ca_pem() == pki["ca"].read_bytes()


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(path) == TOKEN
    path.write_text("short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        read_token(path)
    path.write_text("has a space in the middle of it")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        read_token(path)
    with pytest.raises(ValueError, match="cannot read the token"):
        read_token(tmp_path / "missing")
    with pytest.raises(ValueError, match="--api-auth token and --api-token-file go together"):
        ApiAuth("token")
    with pytest.raises(ValueError, match="--api-auth must be one of"):
        ApiAuth("password")


def _gateway_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--artifacts", str(tmp_path), "--trusted-key", str(tmp_path / "k.pem"), *extra]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-auth", "cert"], "--api-auth cert needs --tls-cert, --tls-key and --tls-ca"),
        (["--api-auth", "token"], "--api-auth token and --api-token-file go together"),
        (["--root-update", "x.json"], "--root-update needs the pinned --root"),
        (["--root", "r.json"], "either --trusted-key or --root, not both"),
        (["--tls-ca", "ca.crt", "--tls-cert", "c.crt"], "--tls-cert and --tls-key go together"),
        ([], "no TLS: give --tls-cert, --tls-key and --tls-ca"),
        (
            ["--insecure", "--tls-ca", "ca.crt", "--tls-cert", "c.crt", "--tls-key", "c.key"],
            "--insecure and --tls-cert/--tls-key/--tls-ca exclude each other",
        ),
        (["--insecure", "--wire-dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_gateway_flag_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.suppress(SystemExit):  # argparse's own errors exit 2 with its usage
        assert aggregator_cli.main(_gateway_argv(tmp_path, *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "mbt-aggregator: error:" in err and message in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_node_flag_errors_are_one_line(
    pki: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = pki["node"]
    base = ["--artifacts", str(tmp_path), "--serve", "0:0"]
    tls = ["--tls-cert", str(node.cert_path), "--tls-key", str(node.key_path)]
    for argv, message in (
        ([*base], "give --trusted-key (one or more) or --root"),
        ([*base, "--trusted-key", "k.pem"], "no TLS: give --tls-cert, --tls-key and --tls-ca"),
        (
            [*base, "--trusted-key", "k.pem", "--insecure", *tls, "--tls-ca", str(pki["ca"])],
            "--insecure and --tls-cert/--tls-key/--tls-ca exclude each other",
        ),
        (
            [*base, "--root", "r.json", *tls, "--tls-ca", str(pki["ca"]), "--node-key", "k"],
            "with TLS the node id is the certificate's; drop --node-key",
        ),
    ):
        assert node_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mbt-node: error:") and message in err, err
        assert len(err.splitlines()) == 1
    args = node_cli.build_parser().parse_args(
        [*base, "--root", "v1.json", "--root-update", "v2", "--insecure"]
    )
    cfg = node_cli.config_from_args(args)
    assert cfg.trust.root == Path("v1.json") and cfg.trust.root_updates == (Path("v2"),)


def test_gateway_api_auth_defaults_to_cert_with_tls(pki: dict[str, Any], tmp_path: Path) -> None:
    gateway = pki["gateway"]
    tls = ["--tls-cert", str(gateway.cert_path), "--tls-key", str(gateway.key_path)]
    tls += ["--tls-ca", str(pki["ca"])]
    parse = aggregator_cli.build_parser().parse_args
    plain = parse(_gateway_argv(tmp_path, "--insecure"))
    assert aggregator_cli.config_from_args(plain).api_auth.mode == "none"
    cfg = aggregator_cli.config_from_args(parse(_gateway_argv(tmp_path, *tls)))
    assert cfg.api_auth.mode == "cert" and cfg.tls.enabled


# --- guards on a real in-process gRPC server ---------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _repeat(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
    async for request in requests:  # the coroutine kind: replies with context.write
        await context.write(request)


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Repeat": grpc.unary_stream_rpc_method_handler(_repeat),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        },
    )


Serve = Callable[[grpc.aio.Channel, str], Awaitable[None]]  # a channel and the address


async def _serve(
    interceptors: list[grpc.aio.ServerInterceptor],
    server_tls: grpc.ServerCredentials | None,
    channel_factory: Callable[[str], grpc.aio.Channel],
    body: Serve,
) -> None:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_handlers(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = "127.0.0.1:0"
    if server_tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_tls)
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        async with channel_factory(address) as channel:
            await body(channel, address)
    finally:
        await server.stop(None)


async def _calls(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> dict[str, grpc.StatusCode]:
    """The status of one call of each kind, and of a health check."""
    out = {}

    async def record(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
            out[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            out[name] = exc.code()

    echo = channel.unary_unary(f"/{_SERVICE}/Echo")
    await record("Echo", lambda: echo(b"x", timeout=5, metadata=metadata))
    repeat = channel.unary_stream(f"/{_SERVICE}/Repeat")
    await record("Repeat", lambda: _drain(repeat(b"x", timeout=5, metadata=metadata)))
    chat = channel.stream_stream(f"/{_SERVICE}/Chat")
    # No request messages: a grpc aio client that writes after the server refused the call
    # may report INTERNAL instead of the server's code (a client-side race, not the guard).
    await record("Chat", lambda: _drain(chat(iter(()), timeout=5, metadata=metadata)))
    health = health_pb2_grpc.HealthStub(channel)
    await record("Health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
    return out


async def _drain(call: Any) -> list[bytes]:
    return [r async for r in call]


OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def test_token_guard_refuses_calls_without_the_token_and_keeps_health_open() -> None:
    seen: dict[str, dict[str, grpc.StatusCode]] = {}

    async def body(channel: grpc.aio.Channel, _address: str) -> None:
        seen["none"] = await _calls(channel)
        seen["wrong"] = await _calls(channel, (("authorization", f"Bearer {TOKEN}x"),))
        seen["basic"] = await _calls(channel, (("authorization", f"Basic {TOKEN}"),))
        seen["right"] = await _calls(channel, (("authorization", f"Bearer {TOKEN}"),))

    guard = Guard(token_check(TOKEN))
    asyncio.run(_serve([guard], None, grpc.aio.insecure_channel, body))
    refused = {"Echo": UNAUTH, "Repeat": UNAUTH, "Chat": UNAUTH, "Health": OK}
    assert seen["none"] == seen["wrong"] == seen["basic"] == refused
    assert seen["right"] == {"Echo": OK, "Repeat": OK, "Chat": OK, "Health": OK}


def _mtls_channel(pki: dict[str, Any], name: str) -> Callable[[str], grpc.aio.Channel]:
    m = _material(pki, name)

    def factory(address: str) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(m.ca_pem, m.key_pem, m.cert_pem)
        return grpc.aio.secure_channel(address, creds)

    return factory


@pytest.mark.parametrize(
    ("guard", "allowed"),
    [
        (
            lambda: Guard(role_check(frozenset({"client", "aggregator"}), "use the API")),
            {"client", "gateway"},
        ),
        (caller_guard, {"gateway"}),
    ],
    ids=["gateway-api", "node"],
)
def test_role_guards_by_certificate_role(
    pki: dict[str, Any], guard: Callable[[], grpc.aio.ServerInterceptor], allowed: set[str]
) -> None:
    server_tls = node_credentials(_material(pki, "node"))  # demands a client certificate
    for name in ("client", "gateway", "node"):
        seen: dict[str, grpc.StatusCode] = {}

        async def body(
            channel: grpc.aio.Channel, _address: str, seen: dict[str, Any] = seen
        ) -> None:
            seen.update(await _calls(channel))

        asyncio.run(_serve([guard()], server_tls, _mtls_channel(pki, name), body))
        want = OK if name in allowed else DENIED
        assert seen == {"Echo": want, "Repeat": want, "Chat": want, "Health": OK}, name


# --- the identity probe and pinned channels ----------------------------------------------


def _probe(pki: dict[str, Any], server: str, ca: str = "ca", plaintext: bool = False) -> str:
    result: list[str] = []

    async def body(_channel: grpc.aio.Channel, address: str) -> None:
        tls = ClusterTls.load(_tls(pki, "gateway"))
        result.append(await presented_node_id(address, tls, 5.0))

    server_tls = None if plaintext else node_credentials(_material(pki, server, ca))
    asyncio.run(_serve([], server_tls, grpc.aio.insecure_channel, body))
    return result[0]


def test_identity_probe_reads_the_certificate_at_an_address(pki: dict[str, Any]) -> None:
    assert _probe(pki, "node") == pki["node"].fingerprint
    with pytest.raises(IdentityError, match="presents a aggregator certificate") as err:
        _probe(pki, "gateway")
    assert err.value.reason == "identity"
    with pytest.raises(IdentityError, match="certificate not trusted") as err:
        _probe(pki, "foreign", ca="foreign_ca")
    assert err.value.reason == "tls"
    with pytest.raises(IdentityError, match="plaintext node") as err:
        _probe(pki, "node", plaintext=True)
    assert err.value.reason == "tls"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    tls = ClusterTls.load(_tls(pki, "gateway"))
    with pytest.raises(IdentityError) as err:
        asyncio.run(presented_node_id(closed, tls, 2.0))
    assert err.value.reason == "unreachable"


def test_pinned_channel_reaches_only_the_expected_node(pki: dict[str, Any]) -> None:
    gateway = _material(pki, "gateway")
    with pytest.raises(ValueError, match="needs the node id it must prove"):
        node_channel("127.0.0.1:1", [], gateway)
    codes: dict[str, grpc.StatusCode] = {}
    for expected in ("node", "client"):  # the node's own id, then another valid id

        def factory(address: str, expected: str = expected) -> grpc.aio.Channel:
            return node_channel(address, [], gateway, pki[expected].fingerprint)

        async def body(channel: grpc.aio.Channel, _address: str, expected: str = expected) -> None:
            try:
                await channel.unary_unary(f"/{_SERVICE}/Echo")(b"x", timeout=5)
                codes[expected] = OK
            except grpc.aio.AioRpcError as exc:
                codes[expected] = exc.code()

        server_tls = node_credentials(_material(pki, "node"))
        asyncio.run(_serve([], server_tls, factory, body))
    assert codes == {"node": OK, "client": grpc.StatusCode.UNAVAILABLE}
