"""Live expansion through real processes: a gateway serving v1 takes a signed v2 that adds
branches (on SIGHUP or a watched folder), keeps its v1 nodes, admits the new branches' node,
ramps beta, and refuses or rolls back what it must.

Each test runs its own gateway on a copy of the v1 artifacts; the v1 nodes serve their own v1
folder and the new node a v2 folder, as separate machines would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from mbt_core.artifacts.export import export_artifacts, publish
from mbt_core.artifacts.manifest import Expansion
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.expand import expand_model
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey, generate_key, load_private_key
from mbt_core.wire.codec import decode
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from tests.integration.test_byzantine import _in_process_logprobs

TEXT = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer"
OLD_NODES = ("0:0,1:0,1:1", "0:1,1:2")  # v1: layers of 2 and 3 branches
NEW_NODE = "0:2,1:3"  # v2 adds one branch to each layer


@dataclass(frozen=True)
class Releases:
    root: Path
    key: GeneratedKey
    tokenizer: Tokenizer
    base: MBTLanguageModel
    grown: MBTLanguageModel
    v1: Path

    def v2(self, name: str, ramp_s: float, model: MBTLanguageModel | None = None) -> Path:
        """The grown model as v2 with this schedule, signed (``model``: another one)."""
        out = self.root / name
        if not out.exists():
            schedule = Expansion(self.base.cfg.branches, 0.0, 1.0, ramp_s)
            info = {"expansion": json.dumps(schedule.to_dict())}
            ckpt = Checkpoint(model or self.grown, self.tokenizer, info)
            manifest = export_artifacts(ckpt, out, model_version=2)
            sign_manifest(out, manifest, load_private_key(self.key.private_path))
        return out


@pytest.fixture(scope="module")
def releases(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer, tiny_config: ModelConfig
) -> Releases:
    root = tmp_path_factory.mktemp("expand")
    cfg = dataclasses.replace(tiny_config, context_length=64)
    torch.manual_seed(0)
    base = MBTLanguageModel(cfg).eval()
    grown = expand_model(base, layers=[0, 1], add=1, init="copy", seed=1).eval()
    key = generate_key(root / "keys", "owner")
    manifest = export_artifacts(Checkpoint(base, tiny_tokenizer), root / "v1")
    sign_manifest(root / "v1", manifest, load_private_key(key.private_path))
    return Releases(root, key, tiny_tokenizer, base, grown, root / "v1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Swarm:
    releases: Releases
    folder: Path  # the gateway's --artifacts
    old: list[ManagedProcess]
    new_address: str
    gateway: ManagedProcess
    stub: gw_grpc.GatewayServiceStub
    start: Callable[..., ManagedProcess]

    def status(self) -> gw.StatusResponse:
        return self.stub.Status(gw.StatusRequest(), timeout=5)

    def wait_for(
        self, predicate: Callable[[gw.StatusResponse], bool], what: str, timeout_s: float = 30
    ) -> gw.StatusResponse:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"{what}: {status}\n{self.gateway.all_output()[-3000:]}")

    def logprobs(self) -> torch.Tensor:
        reply = self.stub.Score(gw.ScoreRequest(text=TEXT, return_logprobs=True), timeout=60)
        return decode(reply.logprobs).float()

    def publish(self, release: Path, signatures: bool = True) -> None:
        """Copy ``release`` over the gateway's folder (as an operator would: manifest last);
        ``signatures=False``: without its signatures, and with the old ones removed."""
        if signatures:
            publish(release, self.folder)
            return
        shutil.rmtree(self.folder / "signatures")
        for path in release.iterdir():
            if path.is_file():
                shutil.copyfile(path, self.folder / path.name)

    def start_new_node(self, release: Path) -> ManagedProcess:
        return self.start(release, NEW_NODE, self.new_address)

    def expected(self, model: MBTLanguageModel) -> torch.Tensor:
        return _in_process_logprobs(model, self.releases.tokenizer.encode(TEXT))


def _trust(releases: Releases, folder: Path, state: str) -> list[str]:
    return [
        "--artifacts",
        str(folder),
        "--trusted-key",
        str(releases.key.public_path),
        "--state-file",
        str(folder.parent / state),
        "--insecure",
    ]


def _swarm(releases: Releases, name: str, *gateway_args: str) -> Iterator[Swarm]:
    started: list[ManagedProcess] = []

    def start(release: Path, serve: str, listen: str = "127.0.0.1:0") -> ManagedProcess:
        args = [*_trust(releases, release, f"{name}-{len(started)}.json"), "--serve", serve]
        node = start_process(
            "mbt_node.cli", [*args, "--listen", listen, "--no-advertise", "--metrics-port", "-1"]
        )
        started.append(node)
        return node

    folder = releases.root / name
    shutil.copytree(releases.v1, folder)
    try:
        old = [start(releases.v1, serve) for serve in OLD_NODES]
        new_address = f"127.0.0.1:{_free_port()}"
        peers = ",".join([*(n.address for n in old), new_address])
        args = [*_trust(releases, folder, f"{name}-gateway.json"), "--listen", "127.0.0.1:0"]
        gateway = start_process(
            "mbt_aggregator.cli",
            [*args, "--metrics-port", "-1", "--no-mdns", "--peers", peers, *gateway_args],
        )
        started.append(gateway)
        with grpc.insecure_channel(gateway.address) as channel:
            swarm = Swarm(
                releases,
                folder,
                old,
                new_address,
                gateway,
                gw_grpc.GatewayServiceStub(channel),
                start,
            )
            swarm.wait_for(lambda s: len(s.nodes) == len(OLD_NODES), "the v1 nodes admitted")
            yield swarm
    finally:
        for p in started:
            p.kill()


@pytest.fixture()
def swarm_sighup(releases: Releases, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    yield from _swarm(releases, request.node.name[:40], "--watch-artifacts", "0")


def _node_ids(status: gw.StatusResponse) -> set[str]:
    return {n.node_id for n in status.nodes}


def test_beta_zero_is_v1_bit_for_bit_and_the_end_of_the_ramp_is_the_grown_checkpoint(
    swarm_sighup: Swarm,
) -> None:
    swarm, rel = swarm_sighup, swarm_sighup.releases
    base, grown = swarm.expected(rel.base), swarm.expected(rel.grown)
    assert not torch.equal(base, grown)  # the new branches do change the output
    assert torch.equal(swarm.logprobs(), base)
    old_ids = _node_ids(swarm.status())

    swarm.publish(rel.v2("v2-now", ramp_s=0))
    swarm.gateway.signal(signal.SIGHUP)
    status = swarm.wait_for(lambda s: s.expansion.state == "waiting", "v2 accepted")
    assert status.model_version == 2 and list(status.expansion.new_branches) == ["0:2", "1:3"]
    # Accepted, but no replica of the new branches yet: beta is 0, the output is v1's exactly.
    assert torch.equal(swarm.logprobs(), base)
    assert _node_ids(swarm.status()) == old_ids

    pids = [n.pid for n in swarm.old]
    swarm.start_new_node(rel.v2("v2-now", ramp_s=0))
    status = swarm.wait_for(lambda s: s.expansion.state == "complete", "the ramp completed")
    assert status.expansion.beta == 1.0 and status.expansion.drift_kl > 0
    assert torch.equal(swarm.logprobs(), grown)
    # The v1 nodes were never restarted and still serve their branches.
    assert [n.pid for n in swarm.old] == pids and all(n.proc.poll() is None for n in swarm.old)
    assert old_ids < _node_ids(swarm.status())
    alphas = {(b.layer, b.branch): b.weight for b in status.branches}
    for layer, mbt_layer in enumerate(rel.grown.layers):
        expect = torch.softmax(mbt_layer.alpha_logits.detach(), 0).tolist()
        got = [alphas[(layer, b)] for b in range(len(expect))]
        assert got == pytest.approx(expect, abs=1e-6)


@pytest.fixture()
def swarm_watching(releases: Releases) -> Iterator[Swarm]:
    yield from _swarm(
        releases, "watching", "--watch-artifacts", "0.3", "--expand-probe-interval", "0.5"
    )


def test_a_ramp_raises_the_new_branches_weight_as_the_schedule_says(
    swarm_watching: Swarm,
) -> None:
    swarm, rel, ramp_s = swarm_watching, swarm_watching.releases, 4.0
    release = rel.v2("v2-ramp", ramp_s=ramp_s)
    swarm.start_new_node(release)
    swarm.publish(release)  # no signal: the gateway sees the folder change
    new_alpha = {
        layer: float(torch.softmax(m.alpha_logits.detach(), 0)[-1])
        for layer, m in enumerate(rel.grown.layers)
    }
    seen: list[tuple[float, float, float]] = []  # (time, beta, weight of new branch 0:2)
    ramping_at = None
    deadline = time.monotonic() + ramp_s + 30
    while time.monotonic() < deadline:
        status = swarm.status()
        state = status.expansion.state
        if state == "ramping" and ramping_at is None:
            ramping_at = time.monotonic()
        if state in ("ramping", "complete"):
            weight = next(b.weight for b in status.branches if (b.layer, b.branch) == (0, 2))
            seen.append((time.monotonic(), status.expansion.beta, weight))
        if state == "complete":
            break
        time.sleep(0.2)
    assert ramping_at is not None and seen and seen[-1][1] == 1.0, seen
    took = seen[-1][0] - ramping_at
    assert ramp_s - 1.0 < took < ramp_s + 6.0, f"the ramp took {took:.1f} s, not {ramp_s}"
    betas = [beta for _, beta, _ in seen]
    assert betas == sorted(betas), "beta only grows"
    assert len({round(b, 3) for b in betas if 0 < b < 1}) >= 3, betas
    for t, beta, weight in seen:
        # The new branch holds beta times its weight in the grown model...
        assert weight == pytest.approx(beta * new_alpha[0], abs=1e-6)
        # ...and beta follows the clock since the ramp began (a tick and a poll behind).
        assert beta <= min(1.0, (t - ramping_at) / ramp_s + 0.25)
    drift = [n for n in swarm.gateway.all_output().splitlines() if "complete at beta" in n]
    assert drift, "the completion is logged"


@pytest.fixture()
def swarm_strict(releases: Releases) -> Iterator[Swarm]:
    # A drift limit no real expansion stays under: the ramp must roll back at its first probe.
    yield from _swarm(releases, "strict", "--watch-artifacts", "0", "--expand-max-kl", "1e-9")


def test_refused_expansions_and_a_drift_rollback_leave_v1_serving(swarm_strict: Swarm) -> None:
    swarm, rel = swarm_strict, swarm_strict.releases
    base = swarm.expected(rel.base)
    old_ids, pids = _node_ids(swarm.status()), [n.pid for n in swarm.old]

    # An old branch changed: not an expansion, whatever its signature says.
    tampered = expand_model(rel.base, layers=[0, 1], add=1, seed=1)
    with torch.no_grad():
        tampered.layers[0].branches[0].blocks[0].attn.proj.weight.add_(0.01)
    swarm.publish(rel.v2("v2-tampered", ramp_s=0, model=tampered))
    swarm.gateway.signal(signal.SIGHUP)
    status = swarm.wait_for(lambda s: s.expansion.state == "refused", "the changed branch refused")
    assert "layer 0 branch 0 changed" in status.expansion.reason and status.model_version == 1

    # A compatible expansion without its signatures.
    swarm.publish(rel.v2("v2-unsigned", ramp_s=0), signatures=False)
    swarm.gateway.signal(signal.SIGHUP)
    status = swarm.wait_for(
        lambda s: "signature" in s.expansion.reason, "the unsigned expansion refused"
    )
    assert status.expansion.state == "refused" and status.model_version == 1
    assert torch.equal(swarm.logprobs(), base)

    # Signed and compatible, but its drift passes the limit: rolled back, v1 serves on.
    release = rel.v2("v2-drifts", ramp_s=0)
    swarm.publish(release)
    swarm.start_new_node(release)
    swarm.gateway.signal(signal.SIGHUP)
    status = swarm.wait_for(lambda s: s.expansion.state == "rolled_back", "the rollback")
    assert "drift" in status.expansion.reason and status.expansion.drift_kl > 1e-9
    assert status.model_version == 1 and status.expansion.beta == 0.0
    assert torch.equal(swarm.logprobs(), base)
    # The v2 node leaves at its next health check; the v1 nodes stayed, never restarted.
    swarm.wait_for(lambda s: _node_ids(s) == old_ids, "only the v1 nodes left")
    assert [n.pid for n in swarm.old] == pids and all(n.proc.poll() is None for n in swarm.old)
    out = swarm.gateway.all_output()
    assert out.count("refused:") == 2 and "rolled back to v1" in out
    assert "Traceback" not in out
