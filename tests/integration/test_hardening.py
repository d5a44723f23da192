"""Hardening, with real processes on 127.0.0.1 (and ::1): what a burst of long prompts, a hostile
LAN host, a bf16 node, a re-export and a dead gateway once broke, each shown to work now.

Plaintext tests pass ``--insecure`` as an operator must; the ownership test runs under both
transports, since the two bind sessions differently (certificate, per-session secret).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from zeroconf import DNSOutgoing, DNSPointer, IPVersion, Zeroconf, const

from mbt_core.artifacts.manifest import read_manifest
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.certs import init_ca, issue_cert
from mbt_core.trust.keys import generate_key
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.contract import SERVICE_TYPE
from mbt_core.wire.gateway_client import GatewayClient
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_node.launcher import node_id
from tests.conftest import SAMPLE_TEXT
from tests.integration.conftest import SignedModel, make_signed_model
from tests.integration.test_byzantine import _in_process_logprobs

pytestmark = [pytest.mark.integration, pytest.mark.mdns]
NODE0, NODE1 = "0:0,1:0,1:1", "0:1,1:2"  # every branch of the test model (2, 3)
ALL = "0:0,0:1,1:0,1:1,1:2"
D = 32  # d_model of the test model
PROMPT = "Shall I"
SECRET = b"hardening-test-secret"
GREEDY = ("--greedy", "--max-new-tokens", "8")


@pytest.fixture(scope="module")
def model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer, tiny_config
) -> SignedModel:
    cfg = replace(tiny_config, context_length=256)  # room for 150-token prompts
    return make_signed_model(tmp_path_factory.mktemp("hardening"), cfg, tiny_tokenizer)


@pytest.fixture(scope="module")
def tokenizer(model: SignedModel) -> Tokenizer:
    from mbt_core.artifacts.load import load_trunk

    return load_trunk(model.directory, read_manifest(model.directory)).tokenizer


def _greedy(model: SignedModel, tok: Tokenizer, prompt: str, n: int) -> list[int]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False)
    return [t for t, _ in generate(model.model, tok.encode(prompt), cfg)]


def _tokens(stub: gw_grpc.GatewayServiceStub, prompt: str = PROMPT, n: int = 8) -> list[int]:
    request = gw.GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0)
    return [e.token_id for e in stub.Generate(request, timeout=60)]


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _metrics(process: ManagedProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = re.search(r"metrics on (\S+?),?(\s|$)", process.ready_line).group(1)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sample(process: ManagedProcess, name: str, **labels: str) -> float:
    return _metrics(process).get((name, tuple(sorted(labels.items()))), 0.0)


def _port(process: ManagedProcess) -> int:
    return int(process.address.rsplit(":", 1)[1])


@dataclass
class Gateway:
    process: ManagedProcess
    channel: grpc.Channel

    @property
    def stub(self) -> gw_grpc.GatewayServiceStub:
        return gw_grpc.GatewayServiceStub(self.channel)

    def addresses(self) -> dict[str, str]:
        """Node id -> the address the gateway uses for it."""
        status = self.stub.Status(gw.StatusRequest(), timeout=5)
        return {n.node_id: n.address for n in status.nodes}


class Processes:
    """Every process a test starts, killed at its end."""

    def __init__(self) -> None:
        self.started: list[ManagedProcess] = []
        self.channels: list[grpc.Channel] = []

    def start(self, module: str, args: list[str], **kw: object) -> ManagedProcess:
        process = start_process(module, args, **kw)  # type: ignore[arg-type]
        self.started.append(process)
        return process

    def gateway(self, model: SignedModel, *extra: str, state: str) -> Gateway:
        process = self.start(
            "mbt_aggregator.cli",
            model.gateway_args("--interface", "127.0.0.1", *extra, state=state),
        )
        channel = grpc.insecure_channel(process.address)
        self.channels.append(channel)
        return Gateway(process, channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for process in self.started:
            process.kill()


@pytest.fixture()
def processes() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.close()


@dataclass
class Cluster:
    nodes: list[ManagedProcess]
    gateway: Gateway


@pytest.fixture(scope="module")
def cluster(model: SignedModel) -> Iterator[Cluster]:
    """Two nodes (every branch once) and a gateway given them as static peers (mDNS stays free
    for the tests that advertise nodes of their own)."""
    p = Processes()
    try:
        nodes = [
            p.start("mbt_node.cli", model.node_args(s, "--no-advertise")) for s in (NODE0, NODE1)
        ]
        peers = ",".join(n.address for n in nodes)
        gateway = p.gateway(
            model, "--no-mdns", "--peers", peers, "--max-requests-per-client", "256", state="c.json"
        )
        _wait(lambda: len(gateway.addresses()) == 2, "both nodes admitted")
        yield Cluster(nodes, gateway)
    finally:
        p.close()


def _long_prompts(tok: Tokenizer, n: int, length: int = 150) -> list[str]:
    """``n`` distinct prompts of about ``length`` tokens, cut from the sample text."""
    words = SAMPLE_TEXT.split()
    prompts = []
    for i in range(n):
        start, count = 3 * i, length // 2
        while len(tok.encode(" ".join(words[start : start + count]))) < length:
            count += 1
        prompts.append(" ".join(words[start : start + count]))
    return prompts


def test_a_burst_of_long_prompts_all_complete_exactly(
    cluster: Cluster, model: SignedModel, tokenizer: Tokenizer
) -> None:
    """128 concurrent ~150-token prompts: the gateway batches them into far more positions than
    a node takes in one call (4,096), so it splits its batches and chunks the prefills. Every
    request completes with the in-process greedy tokens."""
    prompts = _long_prompts(tokenizer, 8)
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    assert min(lengths) >= 150 and 128 * min(lengths) > 4096
    expected = {p: _greedy(model, tokenizer, p, 3) for p in prompts}

    async def burst() -> list[list[int] | str]:
        async with grpc.aio.insecure_channel(cluster.gateway.process.address) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)

            async def one(prompt: str) -> list[int] | str:
                request = gw.GenerateRequest(prompt=prompt, max_new_tokens=3, temperature=0)
                try:
                    return [e.token_id async for e in stub.Generate(request, timeout=120)]
                except grpc.aio.AioRpcError as err:
                    return f"{err.code().name}: {err.details()}"

            return await asyncio.gather(*(one(prompts[i % 8]) for i in range(128)))

    results = asyncio.run(burst())
    failed = [r for r in results if isinstance(r, str)]
    assert not failed, f"{len(failed)} of 128 failed, e.g. {failed[0]}"
    wrong = [i for i, r in enumerate(results) if r != expected[prompts[i % 8]]]
    assert not wrong, f"{len(wrong)} of 128 differ from the in-process greedy tokens"


def _goodbye(zc: Zeroconf, name: str) -> None:
    """What a node's SIGTERM sends (a PTR record with TTL 0), forged by another host."""
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    ptr = DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 0, name)
    out.add_answer_at_time(ptr, 0)
    zc.send(out)


def test_a_forged_goodbye_does_not_drop_a_healthy_node(
    model: SignedModel, processes: Processes
) -> None:
    node = processes.start("mbt_node.cli", model.node_args(ALL, "--interface", "127.0.0.1"))
    gateway = processes.gateway(model, state="goodbye.json")
    _wait(lambda: node_id(node) in gateway.addresses(), "the node admitted over mDNS")
    name = re.search(r"advertised as (\S+)", node.ready_line).group(1)
    before = _sample(gateway.process, "mbt_membership_events_total", event="goodbye_ignored")
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        for _ in range(3):  # multicast may drop one
            _goodbye(zc, name)
            time.sleep(0.2)
    finally:
        zc.close()
    seen: list[set[str]] = []

    def ignored() -> bool:
        seen.append(set(gateway.addresses()))
        now = _sample(gateway.process, "mbt_membership_events_total", event="goodbye_ignored")
        return now > before

    _wait(ignored, "the goodbye ignored", timeout_s=15)
    time.sleep(1.5)  # a wrongly believed goodbye took the node away for 2-3 s
    seen.append(set(gateway.addresses()))
    assert all(node_id(node) in ids for ids in seen), "the node was dropped"
    assert "it still answers its health check (forged?)" in gateway.process.all_output()


def test_the_client_fails_over_between_two_gateways(
    cluster: Cluster, model: SignedModel, tokenizer: Tokenizer, processes: Processes
) -> None:
    """A second gateway on the same nodes (static peers): both serve at once, with sessions of
    their own; a client given a dead gateway first goes on to a live one, and so does
    ``mbt generate --gateway DEAD,LIVE``."""
    peers = ",".join(n.address for n in cluster.nodes)
    second = processes.gateway(model, "--no-mdns", "--peers", peers, state="second.json")
    _wait(lambda: len(second.addresses()) == 2, "the second gateway's nodes")
    expected = _greedy(model, tokenizer, PROMPT, 24)
    got: dict[str, list[int]] = {}

    def run(name: str, g: Gateway) -> None:
        got[name] = _tokens(g.stub, PROMPT, 24)

    threads = [
        threading.Thread(target=run, args=(n, g))
        for n, g in (("first", cluster.gateway), ("second", second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {"first": expected, "second": expected}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    client = GatewayClient([dead, second.process.address], timeout_s=60)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, stop_at_eos=False)
    assert [e.token_id for e in client.generate(PROMPT, cfg)] == expected[:8]
    assert client.status().nodes  # the live one answers status too
    assert client.score("Shall I compare thee").tokens > 0

    def cli(gateways: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mbt_core.cli",
                "generate",
                PROMPT,
                "--gateway",
                gateways,
                *GREEDY,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    direct, failed_over = cli(second.process.address), cli(f"{dead},{second.process.address}")
    assert direct.returncode == 0 and failed_over.returncode == 0, failed_over.stderr
    assert failed_over.stdout == direct.stdout and direct.stdout.strip()
    none = cli(dead)
    assert none.returncode != 0 and len(none.stderr.strip().splitlines()) == 1, none.stderr
    assert f"gateway {dead}: UNAVAILABLE" in none.stderr

    def sessions(node: ManagedProcess) -> int:
        with grpc.insecure_channel(node.address) as channel:
            info = pb_grpc.BranchServiceStub(channel).Describe(pb.DescribeRequest(), timeout=5)
        return info.open_sessions

    _wait(lambda: all(sessions(n) == 0 for n in cluster.nodes), "every session ended", 10)


def test_a_copied_id_advertiser_never_displaces_the_healthy_node(
    model: SignedModel, tokenizer: Tokenizer, processes: Processes, tmp_path: Path
) -> None:
    """Plaintext: a rogue with the real node's key (so Describe agrees with the copied record),
    advertised at another port, and corrupting every output. The gateway refuses it while the
    real node answers, and output stays exact. Paused long enough, the real node loses its id
    to the rogue; resumed, it is reinstated at once."""
    key = generate_key(tmp_path / "keys", "node").private_path
    args = ["--interface", "127.0.0.1", "--node-key", str(key)]
    real = processes.start("mbt_node.cli", model.node_args(NODE0, *args))
    processes.start("mbt_node.cli", model.node_args(NODE1, "--interface", "127.0.0.1"))
    gateway = processes.gateway(model, state="copied.json")
    _wait(lambda: len(gateway.addresses()) == 2, "both nodes admitted over mDNS")
    the_id, expected = node_id(real), _greedy(model, tokenizer, PROMPT, 8)
    rogue = processes.start(
        "mbt_node.cli",
        model.node_args(NODE0, *args, "--unsafe-test-fault", "corrupt=flip,seed=1"),
        env={"MBT_ENABLE_TEST_FAULTS": "1"},
    )
    assert node_id(rogue) == the_id and rogue.address != real.address
    conflicts = ("mbt_nodes_rejected_total", (("reason", "conflict"),))
    _wait(lambda: _metrics(gateway.process).get(conflicts, 0) >= 1, "the rogue refused")
    assert _sample(gateway.process, "mbt_membership_events_total", event="id_conflict") >= 1
    for _ in range(4):
        assert _tokens(gateway.stub) == expected
    assert gateway.addresses()[the_id] == real.address

    real.signal(signal.SIGSTOP)
    try:
        _wait(lambda: gateway.addresses().get(the_id) == rogue.address, "the id taken", 40)
    finally:
        real.signal(signal.SIGCONT)
    _wait(lambda: gateway.addresses().get(the_id) == real.address, "the real node back", 15)
    assert _sample(gateway.process, "mbt_membership_events_total", event="reinstated") >= 1
    for _ in range(4):
        assert _tokens(gateway.stub) == expected


def _forward(
    stub: pb_grpc.BranchServiceStub, session: str, start: int, x: torch.Tensor, secret: bytes
) -> torch.Tensor:
    step = pb.SessionStep(session_id=session, start=start, length=len(x), secret=secret)
    request = pb.ForwardRequest(layer=0, branches=[0], steps=[step], inputs=encode(x))
    return decode(stub.Forward(request, timeout=10).outputs[0].outputs).clone()


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@dataclass(frozen=True)
class Callers:
    """How the node is started, and the channels of its owner and of a third party."""

    node_args: list[str]
    owner: Callable[[str], grpc.Channel]
    third: Callable[[str], grpc.Channel]
    third_secret: bytes  # what the third party sends: under TLS even the owner's secret


def _callers(transport: str, root: Path) -> Callers:
    if transport == "insecure":
        return Callers([], grpc.insecure_channel, grpc.insecure_channel, b"another-callers-secret")
    init_ca(root / "ca")
    node = issue_cert(root / "ca", "node", root / "certs")
    owners = [issue_cert(root / "ca", n, root / "certs", role="aggregator") for n in ("a", "b")]
    ca = (root / "ca" / "ca.crt").read_bytes()

    def channel_of(i: int) -> Callable[[str], grpc.Channel]:
        c = owners[i]
        creds = grpc.ssl_channel_credentials(ca, c.key_path.read_bytes(), c.cert_path.read_bytes())
        return lambda address: grpc.secure_channel(address, creds)

    tls = ["--tls-cert", str(node.cert_path), "--tls-key", str(node.key_path)]
    return Callers(
        [*tls, "--tls-ca", str(root / "ca" / "ca.crt")], channel_of(0), channel_of(1), SECRET
    )


@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_a_third_party_cannot_touch_another_callers_session(
    transport: str, signed_model: SignedModel, processes: Processes, tmp_path: Path
) -> None:
    """A Forward into, a rollback of and an end of someone else's session are each refused
    with PERMISSION_DENIED, counted, and name no session id; the owner's cache is untouched."""
    callers = _callers(transport, tmp_path)
    node = processes.start(
        "mbt_node.cli",
        signed_model.node_args("0:0", "--no-advertise", "--metrics-port", "0", *callers.node_args),
    )
    session = "victim-session-3f9a2c"
    torch.manual_seed(5)
    h = torch.randn(12, D)
    with callers.owner(node.address) as mine, callers.third(node.address) as theirs:
        owner, third = pb_grpc.BranchServiceStub(mine), pb_grpc.BranchServiceStub(theirs)
        _forward(owner, session, 0, h[:8], SECRET)
        noise = torch.randn(4, D)
        attempts = {
            "write": lambda: _forward(third, session, 8, noise, callers.third_secret),
            "rollback": lambda: _forward(third, session, 2, noise, callers.third_secret),
            "end": lambda: third.EndSession(
                pb.EndSessionRequest(session_id=session, secret=callers.third_secret), timeout=10
            ),
        }
        for what, attempt in attempts.items():
            err = _refused(attempt)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (what, err.details())
            assert "another caller" in err.details() and session not in err.details()
        rest = _forward(owner, session, 8, h[8:], SECRET)
        with torch.no_grad():
            ref = signed_model.model.layers[0].branches[0](h[None])[0]
        assert (rest - ref[8:]).abs().max().item() < 1e-5  # the cache is the owner's still
        info = owner.Describe(pb.DescribeRequest(), timeout=5)
        assert info.open_sessions == 1 and session not in str(info)
    assert _sample(node, "mbt_node_session_events_total", event="not_owner") == 3
    assert session not in node.all_output()


def test_a_session_flood_by_one_caller_leaves_the_gateway_served(
    model: SignedModel, tokenizer: Tokenizer, processes: Processes
) -> None:
    """A node on [::] holding at most 64 sessions, 32 per caller. Another host (::1) opens
    sessions until refused; the refusal names the quota, is counted, and the gateway (from
    127.0.0.1) keeps generating exactly, with concurrent requests."""
    node = processes.start(
        "mbt_node.cli",
        model.node_args(
            ALL,
            *("--no-advertise", "--listen", "[::]:0", "--metrics-port", "0"),
            *("--max-sessions", "64", "--max-sessions-per-caller", "32"),
        ),
    )
    port = _port(node)
    gateway = processes.gateway(
        model, "--no-mdns", "--peers", f"127.0.0.1:{port}", state="flood.json"
    )
    _wait(lambda: len(gateway.addresses()) == 1, "the node admitted")
    opened, refusal = 0, None
    with grpc.insecure_channel(f"[::1]:{port}") as channel:
        stub = pb_grpc.BranchServiceStub(channel)
        x = torch.randn(4, D)
        for i in range(200):
            try:
                _forward(stub, f"flood-{i}", 0, x, SECRET)
                opened += 1
            except grpc.RpcError as err:
                refusal = err
                break
    assert opened == 32 and refusal is not None
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "(--max-sessions-per-caller)" in refusal.details()
    assert _sample(node, "mbt_node_refusals_total", limit="max_sessions_per_caller") >= 1
    expected = _greedy(model, tokenizer, PROMPT, 12)
    got: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda: got.append(_tokens(gateway.stub, PROMPT, 12)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [expected] * 8


def test_a_bf16_node_serves_the_gateway_and_the_kl_is_reported(
    model: SignedModel, tokenizer: Tokenizer, processes: Processes
) -> None:
    """The gateway reads the node's dtype from Describe and sends it bfloat16 (``--wire-dtype
    auto``); scored logprobs stay close to the float32 model's."""
    node = processes.start(
        "mbt_node.cli", model.node_args(ALL, "--no-advertise", "--dtype", "bfloat16")
    )
    gateway = processes.gateway(model, "--no-mdns", "--peers", node.address, state="bf16.json")
    _wait(lambda: len(gateway.addresses()) == 1, "the bf16 node admitted")
    assert len(_tokens(gateway.stub, PROMPT, 8)) == 8
    text = SAMPLE_TEXT[:600]
    reply = gateway.stub.Score(gw.ScoreRequest(text=text, return_logprobs=True), timeout=60)
    remote = decode(reply.logprobs).float()
    ref = _in_process_logprobs(model.model, tokenizer.encode(text))
    kl = float((ref.exp() * (ref - remote)).sum(-1).mean())
    print(f"bf16 node through the gateway: KL vs float32 = {kl:.3g} nats per position")
    assert 0 < kl < 0.02
    metrics = _metrics(gateway.process)
    sent = metrics[("mbt_wire_bytes_total", (("direction", "sent"),))]
    steps = sum(v for (name, _), v in metrics.items() if name == "mbt_layer_step_seconds_count")
    print(f"bf16 wire: {sent / steps:.0f} bytes sent per layer step")
    assert steps > 0 and sent > 0


def _mbt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbt_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_exporting_twice_with_default_flags_then_starting_again_works(
    tiny_checkpoint: Path, processes: Processes, tmp_path: Path
) -> None:
    """Re-exports (new calibration, key, expiry) get a version above what this machine
    accepted, so node and gateway take the newer one; a version given by hand that collides
    is refused with a message that names the flag."""
    env = {"MBT_STATE_DIR": str(tmp_path / "state")}
    key = generate_key(tmp_path / "keys", "owner")
    trust = ["--trusted-key", str(key.public_path)]
    versions = []
    for name in ("first", "second"):
        out = tmp_path / name
        exported = _mbt("export", str(tiny_checkpoint), str(out), env=env)
        assert exported.returncode == 0, exported.stderr
        signed = _mbt("sign", str(out), "--key", str(key.private_path), env=env)
        assert signed.returncode == 0, signed.stderr
        versions.append(read_manifest(out).model_version)
        artifacts = ["--artifacts", str(out), *trust, "--insecure"]
        node = processes.start(
            "mbt_node.cli", [*artifacts, "--serve", "0:0", "--no-advertise"], env=env
        )
        gateway = processes.start(
            "mbt_aggregator.cli",
            [
                *artifacts,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "-1",
                "--no-mdns",
                "--peers",
                node.address,
            ],
            env=env,
        )
        assert node.terminate() == 0 and gateway.terminate() == 0
    assert versions[1] > versions[0] >= 1
    again = tmp_path / "again"
    exported = _mbt(
        "export", str(tiny_checkpoint), str(again), "--model-version", str(versions[1]), env=env
    )
    assert exported.returncode == 0, exported.stderr
    assert _mbt("sign", str(again), "--key", str(key.private_path), env=env).returncode == 0
    refused = _mbt("verify", str(again), *trust, env=env)
    assert refused.returncode != 0
    assert "--model-version" in refused.stderr, refused.stderr
