"""Identity and transport security with real processes on 127.0.0.1: mutual TLS between gateway
and nodes, node ids proven by certificates (mDNS and static peers), rogue advertisements, the
gateway API's client-certificate and bearer-token modes, signed rosters, trust-root rotation."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.load import load_trunk
from mbt_core.artifacts.manifest import read_manifest
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.process import ManagedProcess, StartError, start_process
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.trust.certs import Issued, init_ca, issue_cert
from mbt_core.trust.keys import generate_key, load_private_key, load_public_key
from mbt_core.trust.root import create_root, rotate_root
from mbt_core.trust.roster import sign_roster
from mbt_core.wire.contract import SERVICE_TYPE
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_node.launcher import node_id
from tests.integration.conftest import SignedModel

pytestmark = [pytest.mark.integration, pytest.mark.mdns]
PROMPT = "Shall I"
TOKEN = "s3cret-token-for-the-tests-0123456789"
NODE0, NODE1 = "0:0,1:0,1:1", "0:1,1:2"  # every branch of the tiny model (2, 3)


@dataclass(frozen=True)
class Pki:
    """A cluster CA with certificates for every role, and a foreign CA with a node of its own."""

    ca: Path
    certs: dict[str, Issued]
    foreign_ca: Path

    def args(self, name: str, ca: Path | None = None) -> list[str]:
        c = self.certs[name]
        cert_ca = ca or self.ca / "ca.crt"
        return [
            "--tls-cert",
            str(c.cert_path),
            "--tls-key",
            str(c.key_path),
            "--tls-ca",
            str(cert_ca),
        ]

    def channel(self, address: str, name: str | None) -> grpc.Channel:
        """A TLS channel presenting ``name``'s certificate (None: only verify the server)."""
        ca = (self.ca / "ca.crt").read_bytes()
        if name is None:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
        c = self.certs[name]
        creds = grpc.ssl_channel_credentials(ca, c.key_path.read_bytes(), c.cert_path.read_bytes())
        return grpc.secure_channel(address, creds)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    init_ca(root / "foreign-ca")
    roles = {
        "node0": "node",
        "node1": "node",
        "rogue": "node",
        "gateway": "aggregator",
        "client": "client",
        "flooder": "client",
    }
    certs = {
        name: issue_cert(root / "ca", name, root / "certs", role=r) for name, r in roles.items()
    }
    certs["foreign"] = issue_cert(root / "foreign-ca", "foreign", root / "foreign-certs")
    return Pki(root / "ca", certs, root / "foreign-ca")


def _gateway(model: SignedModel, *extra: str, state: str = "gateway.json") -> ManagedProcess:
    return start_process(
        "mbt_aggregator.cli", model.gateway_args("--interface", "127.0.0.1", *extra, state=state)
    )


@dataclass
class Gateway:
    process: ManagedProcess
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    token_file: Path | None = None

    @property
    def stub(self) -> gw_grpc.GatewayServiceStub:
        return gw_grpc.GatewayServiceStub(self.channel)

    def status(self) -> gw.StatusResponse:
        return self.stub.Status(gw.StatusRequest(), timeout=5, metadata=self.metadata)

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.status().nodes}

    def rejected(self, reason: str) -> float:
        url = re.search(r"metrics on (\S+)", self.process.ready_line).group(1).rstrip(",")
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        pattern = rf'^mbt_nodes_rejected_total{{reason="{reason}"}} (\S+)$'
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class TlsCluster:
    model: SignedModel
    pki: Pki
    nodes: list[ManagedProcess]
    gateway: Gateway


@pytest.fixture(scope="module")
def tls_cluster(signed_model: SignedModel, pki: Pki) -> Iterator[TlsCluster]:
    """node0 known only as a static peer, node1 only over mDNS; gateway with --api-auth cert."""
    started: list[ManagedProcess] = []

    def start(module: str, args: list[str]) -> ManagedProcess:
        process = start_process(module, args)
        started.append(process)
        return process

    try:
        node0 = start(
            "mbt_node.cli", signed_model.node_args(NODE0, "--no-advertise", *pki.args("node0"))
        )
        node1 = start("mbt_node.cli", signed_model.node_args(NODE1, *pki.args("node1")))
        process = _gateway(signed_model, "--peers", node0.address, *pki.args("gateway"))
        started.append(process)
        gateway = Gateway(process, pki.channel(process.address, "client"))
        _wait(lambda: len(gateway.node_ids()) == 2, "both TLS nodes admitted")
        yield TlsCluster(signed_model, pki, [node0, node1], gateway)
        gateway.channel.close()
    finally:
        for p in started:
            p.kill()


def _in_process(model: SignedModel, n: int) -> list[int]:
    tok = load_trunk(model.directory, read_manifest(model.directory)).tokenizer
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False)
    return [t for t, _ in generate(model.model, tok.encode(PROMPT), cfg)]


def _generate(gateway: Gateway, n: int = 16) -> list[gw.GenerateEvent]:
    request = gw.GenerateRequest(prompt=PROMPT, max_new_tokens=n, temperature=0)
    return list(gateway.stub.Generate(request, timeout=60, metadata=gateway.metadata))


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbt_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tls_cluster_generates_the_in_process_tokens(tls_cluster: TlsCluster) -> None:
    pki, gateway = tls_cluster.pki, tls_cluster.gateway
    fingerprints = {pki.certs["node0"].fingerprint, pki.certs["node1"].fingerprint}
    # Node ids are certificate fingerprints: the static peer's learned, the mDNS one's proven.
    assert gateway.node_ids() == fingerprints
    assert {node_id(n) for n in tls_cluster.nodes} == fingerprints
    assert all("mutual TLS" in n.ready_line for n in tls_cluster.nodes)
    assert "mutual TLS to nodes, API auth cert" in gateway.process.ready_line
    assert "warning: plaintext" not in gateway.process.all_output()
    events = _generate(gateway)
    assert [e.token_id for e in events] == _in_process(tls_cluster.model, 16)
    assert {b.node_id for e in events for layer in e.layers for b in layer.branches} == (
        fingerprints
    )
    # The CLI client with a client certificate gets the same text.
    cli = _cli(
        "generate",
        PROMPT,
        "--gateway",
        gateway.process.address,
        "--greedy",
        "--max-new-tokens",
        "16",
        *pki.args("client"),
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == PROMPT + "".join(e.text for e in events) + "\n"


def test_gateway_api_needs_a_client_certificate(tls_cluster: TlsCluster) -> None:
    pki, address = tls_cluster.pki, tls_cluster.gateway.process.address
    status = gw.StatusRequest()
    with grpc.insecure_channel(address) as plain:
        code = _code(lambda: gw_grpc.GatewayServiceStub(plain).Status(status, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE  # no TLS: no connection at all
    with pki.channel(address, None) as anonymous:  # TLS, but no client certificate
        code = _code(lambda: gw_grpc.GatewayServiceStub(anonymous).Status(status, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    foreign = pki.certs["foreign"]
    creds = grpc.ssl_channel_credentials(
        (pki.ca / "ca.crt").read_bytes(),
        foreign.key_path.read_bytes(),
        foreign.cert_path.read_bytes(),
    )
    with grpc.secure_channel(address, creds) as outsider:
        code = _code(lambda: gw_grpc.GatewayServiceStub(outsider).Status(status, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    with pki.channel(address, "node0") as node_cert:  # a cluster certificate, but a node's
        code = _code(lambda: gw_grpc.GatewayServiceStub(node_cert).Status(status, timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        health = health_pb2_grpc.HealthStub(node_cert).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes: any cert
    cli = _cli("generate", "x", "--gateway", address, "--max-new-tokens", "2")
    assert cli.returncode == 2 and "UNAVAILABLE" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_nodes_answer_only_the_gateway_certificate(tls_cluster: TlsCluster) -> None:
    pki, address = tls_cluster.pki, tls_cluster.nodes[0].address
    describe = pb.DescribeRequest()
    with grpc.insecure_channel(address) as plain:
        code = _code(lambda: pb_grpc.BranchServiceStub(plain).Describe(describe, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    with pki.channel(address, "client") as client:
        stub = pb_grpc.BranchServiceStub(client)
        assert _code(lambda: stub.Describe(describe, timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        health = health_pb2_grpc.HealthStub(client).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pki.channel(address, "gateway") as gateway:
        info = pb_grpc.BranchServiceStub(gateway).Describe(describe, timeout=5)
    assert info.node_id == pki.certs["node0"].fingerprint


def test_node_without_a_valid_certificate_is_rejected(
    tls_cluster: TlsCluster, node_factory: Callable[..., ManagedProcess]
) -> None:
    pki, model, gateway = tls_cluster.pki, tls_cluster.model, tls_cluster.gateway
    before = gateway.rejected("tls")
    foreign_ca = pki.foreign_ca / "ca.crt"
    outsider = node_factory(model.node_args("0:1", *pki.args("foreign", ca=foreign_ca)))
    plaintext = node_factory(model.node_args("1:2"))
    expected = (
        f"node {outsider.address} rejected (tls): certificate not trusted",
        f"node {plaintext.address} rejected (tls): TLS handshake failed",
    )
    _wait(lambda: all(e in gateway.process.all_output() for e in expected), "both rejected")
    assert gateway.rejected("tls") >= before + 2
    ids = gateway.node_ids()
    assert node_id(outsider) not in ids and node_id(plaintext) not in ids
    assert len(ids) == 2


@pytest.fixture()
def zeroconf() -> Iterator[Zeroconf]:
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    yield zc
    zc.unregister_all_services()
    zc.close()


def _copy_record(zc: Zeroconf, real: ManagedProcess, to: ManagedProcess) -> ServiceInfo:
    """Advertise ``to``'s port under a TXT record copied from ``real``'s advertisement."""
    name = re.search(r"advertised as (\S+)", real.ready_line).group(1)
    original = zc.get_service_info(SERVICE_TYPE, name, timeout=3000)
    assert original is not None and original.properties[b"id"] == node_id(real).encode()
    port = int(to.address.rsplit(":", 1)[1])
    instance = f"mbt-rogue-{port}"
    copy = ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=port,
        properties=original.properties,
        server=f"{instance}.local.",
    )
    zc.register_service(copy)
    return copy


def test_rogue_mdns_record_with_a_copied_node_id_is_rejected(
    tls_cluster: TlsCluster, zeroconf: Zeroconf, node_factory: Callable[..., ManagedProcess]
) -> None:
    pki, gateway = tls_cluster.pki, tls_cluster.gateway
    # A real node with a valid cluster certificate (another key), not advertised by itself.
    rogue = node_factory(tls_cluster.model.node_args(NODE1, "--no-advertise", *pki.args("rogue")))
    before = gateway.rejected("identity")
    _copy_record(zeroconf, tls_cluster.nodes[1], rogue)
    claimed, actual = pki.certs["node1"].fingerprint, pki.certs["rogue"].fingerprint
    expected = (
        f"node {rogue.address} rejected (identity): its certificate proves node {actual[:16]}, "
        f"but its mDNS record says {claimed[:16]}"
    )
    _wait(lambda: expected in gateway.process.all_output(), "the copied record rejected")
    assert gateway.rejected("identity") >= before + 1
    assert gateway.node_ids() == {pki.certs["node0"].fingerprint, claimed}


def test_rogue_mdns_record_is_rejected_in_plaintext_too(
    signed_model: SignedModel, zeroconf: Zeroconf
) -> None:
    """Without TLS nothing is proven, but a record whose id differs from what the node at that
    address reports is still refused (and the gateway warned at start that it is plaintext)."""
    started: list[ManagedProcess] = []
    try:
        real = start_process("mbt_node.cli", signed_model.node_args(NODE0))
        started.append(real)
        rogue = start_process("mbt_node.cli", signed_model.node_args(NODE1, "--no-advertise"))
        started.append(rogue)
        process = _gateway(signed_model, state="plain-gateway.json")
        started.append(process)
        gateway = Gateway(process, grpc.insecure_channel(process.address))
        _wait(lambda: node_id(real) in gateway.node_ids(), "the advertised node admitted")
        _copy_record(zeroconf, real, rogue)
        expected = (
            f"node {rogue.address} rejected (identity): Describe reports node "
            f"{node_id(rogue)[:16]}, but its mDNS record says {node_id(real)[:16]}"
        )
        _wait(lambda: expected in process.all_output(), "the copied record rejected")
        assert gateway.rejected("identity") >= 1
        assert node_id(rogue) not in gateway.node_ids()
        assert (
            process.all_output().count("mbt-aggregator: warning: --insecure: plaintext gRPC") == 1
        )
        assert real.all_output().count("mbt-node: warning: --insecure: plaintext gRPC") == 1
        gateway.channel.close()
    finally:
        for p in started:
            p.kill()


@pytest.fixture(scope="module")
def token_gateway(
    tls_cluster: TlsCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A second gateway over the same nodes: bearer token over TLS, roster of node0 only."""
    root = tmp_path_factory.mktemp("token")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    model, pki = tls_cluster.model, tls_cluster.pki
    roster = root / "roster.json"
    key = load_private_key(model.key.private_path)
    roster.write_bytes(sign_roster([pki.certs["node0"].fingerprint], [key]).to_json())
    peers = ",".join(n.address for n in tls_cluster.nodes)
    process = _gateway(
        model,
        "--no-mdns",
        "--peers",
        peers,
        "--roster",
        str(roster),
        "--api-auth",
        "token",
        "--api-token-file",
        str(token_file),
        *pki.args("gateway"),
        state="token-gateway.json",
    )
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    gateway = Gateway(process, pki.channel(process.address, None), bearer, token_file)
    try:
        yield gateway
    finally:
        gateway.channel.close()
        process.kill()


def test_token_auth(token_gateway: Gateway, tls_cluster: TlsCluster) -> None:
    stub, status = token_gateway.stub, gw.StatusRequest()
    assert _code(lambda: stub.Status(status, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", f"Bearer {TOKEN[:-1]}x"),)
    code = _code(lambda: stub.Status(status, timeout=5, metadata=wrong))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    request = gw.GenerateRequest(prompt=PROMPT, max_new_tokens=4, temperature=0)
    assert _code(lambda: list(stub.Generate(request, timeout=30))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    health = health_pb2_grpc.HealthStub(token_gateway.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    _wait(lambda: len(token_gateway.node_ids()) == 1, "the roster's node admitted")
    ca = str(tls_cluster.pki.ca / "ca.crt")
    base = ["generate", PROMPT, "--gateway", token_gateway.process.address, "--tls-ca", ca]
    base += ["--greedy", "--max-new-tokens", "3"]
    refused = _cli(*base)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    allowed = _cli(*base, "--token-file", str(token_gateway.token_file))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith(PROMPT) and len(allowed.stdout) > len(PROMPT) + 1


def test_roster_excludes_a_node(token_gateway: Gateway, tls_cluster: TlsCluster) -> None:
    pki = tls_cluster.pki
    expected = f"node id {pki.certs['node1'].fingerprint[:16]} is not in the signed roster"
    _wait(lambda: expected in token_gateway.process.all_output(), "node1 rejected (roster)")
    assert token_gateway.rejected("roster") >= 1
    assert token_gateway.node_ids() == {pki.certs["node0"].fingerprint}
    assert "roster of 1 node(s)" in token_gateway.process.ready_line


# --- trust root rotation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    artifacts: Path  # signed by the new key only
    v1: Path
    v2: Path  # a valid rotation to the new key
    forged_v2: Path  # version 2 signed by the new key alone


@pytest.fixture()
def rotation(signed_model: SignedModel, tmp_path: Path) -> Rotation:
    old, new = generate_key(tmp_path / "keys", "old"), generate_key(tmp_path / "keys", "new")
    old_private, new_private = (
        load_private_key(old.private_path),
        load_private_key(new.private_path),
    )
    new_public = load_public_key(new.public_path)
    v1 = create_root([load_public_key(old.public_path)], 1, [old_private])
    v2 = rotate_root(v1, [new_public], 1, [old_private, new_private])
    forged = create_root([new_public], 1, [new_private], version=2)
    paths = {}
    for name, root in (("v1", v1), ("v2", v2), ("forged", forged)):
        paths[name] = tmp_path / f"root-{name}.json"
        paths[name].write_bytes(root.document.to_json())
    tok = load_trunk(signed_model.directory, read_manifest(signed_model.directory)).tokenizer
    artifacts = tmp_path / "artifacts"
    manifest = export_artifacts(Checkpoint(signed_model.model, tok), artifacts)
    sign_manifest(artifacts, manifest, new_private)
    return Rotation(artifacts, paths["v1"], paths["v2"], paths["forged"])


def _root_args(rotation: Rotation, state: Path, *roots: Path) -> list[str]:
    args = ["--artifacts", str(rotation.artifacts), "--state-file", str(state / "state.json")]
    args += ["--root", str(roots[0]), "--insecure"]
    for update in roots[1:]:
        args += ["--root-update", str(update)]
    return args


def test_valid_key_rotation_is_used_by_node_and_gateway(rotation: Rotation, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    started: list[ManagedProcess] = []
    try:
        node = start_process(
            "mbt_node.cli",
            [
                *_root_args(rotation, state, rotation.v1, rotation.v2),
                "--serve",
                NODE0 + ",0:1,1:2",
                "--no-advertise",
            ],
        )
        started.append(node)
        gateway_args = _root_args(rotation, state, rotation.v1, rotation.v2)
        gateway_args[gateway_args.index("--state-file") + 1] = str(state / "gateway.json")
        process = start_process(
            "mbt_aggregator.cli",
            [
                *gateway_args,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "-1",
                "--no-mdns",
                "--peers",
                node.address,
            ],
        )
        started.append(process)
        gateway = Gateway(process, grpc.insecure_channel(process.address))
        _wait(lambda: gateway.node_ids() == {node_id(node)}, "the node admitted")
        assert len(_generate(gateway, 3)) == 3
        gateway.channel.close()
        # The accepted rotation is remembered: a restart with only v1 pinned trusts v2's key.
        node.kill()
        again = start_process(
            "mbt_node.cli",
            [*_root_args(rotation, state, rotation.v1), "--serve", "0:0", "--no-advertise"],
        )
        started.append(again)
        roots = json.loads((state / "trust-roots.json").read_text())["roots"]
        assert len(roots) == 1
    finally:
        for p in started:
            p.kill()


def test_invalid_key_rotation_refuses_to_start(rotation: Rotation, tmp_path: Path) -> None:
    for module, extra in (
        ("mbt_node.cli", ["--serve", "0:0", "--no-advertise"]),
        ("mbt_aggregator.cli", ["--listen", "127.0.0.1:0", "--metrics-port", "-1"]),
    ):
        state = tmp_path / module
        state.mkdir()
        args = [*_root_args(rotation, state, rotation.v1, rotation.forged_v2), *extra]
        with pytest.raises(StartError) as err:
            start_process(module, args)
        message = str(err.value)
        assert "exited with code 2" in message, message
        assert "trust root version 2 is not signed by the keys of version 1" in message
        output = message.split(": ", 1)[1]
        assert len(output.strip().splitlines()) == 1, output  # one line, no traceback
        assert not (state / "trust-roots.json").exists()
        # Without a root of trust at all, or with both kinds, the error is one line too.
        both = [*args, "--trusted-key", str(rotation.v1)]
        with pytest.raises(StartError, match="give either --trusted-key or --root, not both"):
            start_process(module, both)


def test_local_cluster_with_tls(tiny_checkpoint: Path) -> None:
    """``LocalCluster(tls=True)``: a throw-away CA, mutual TLS everywhere, certified node ids."""
    from mbt_core.cluster.local import Layout, LocalCluster
    from mbt_core.wire.gateway_client import generate_remote

    with LocalCluster(checkpoint=tiny_checkpoint, layout=Layout(nodes=2), tls=True) as cluster:
        status = cluster.status()  # with the cluster's client certificate
        assert {n.node_id for n in status.nodes} == set(cluster.node_ids)
        assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in cluster.node_ids)
        assert "mutual TLS to nodes, API auth cert" in cluster.gateway.ready_line
        cfg = SamplingConfig(max_new_tokens=3, temperature=0)
        events = list(
            generate_remote(cluster.address, PROMPT, cfg, credentials=cluster.credentials)
        )
        assert len(events) == 3
        with grpc.insecure_channel(cluster.address) as plain:
            stub = gw_grpc.GatewayServiceStub(plain)
            assert _code(lambda: stub.Status(gw.StatusRequest(), timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE
            )


def test_a_flooding_client_leaves_the_others_served(tls_cluster: TlsCluster) -> None:
    """One client (certificate) floods Generate: beyond the per-client limit (16) it gets
    RESOURCE_EXHAUSTED, while another client's generation runs and stays exact."""
    gateway = tls_cluster.gateway
    flood_channel = tls_cluster.pki.channel(gateway.process.address, "flooder")
    flood_stub = gw_grpc.GatewayServiceStub(flood_channel)
    request = gw.GenerateRequest(prompt=PROMPT, max_new_tokens=48, temperature=0)
    codes: list[grpc.StatusCode] = []

    def flood() -> None:
        try:
            list(flood_stub.Generate(request, timeout=120))
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())

    threads = [threading.Thread(target=flood) for _ in range(40)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)  # the flood is running
        legit = _generate(gateway, 16)
        assert [e.token_id for e in legit] == _in_process(tls_cluster.model, 16)
    finally:
        for t in threads:
            t.join(timeout=180)
        flood_channel.close()
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 40 - 16 - 4, codes  # a few may start after others finished
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= 1
