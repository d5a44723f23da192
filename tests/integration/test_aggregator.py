"""Aggregator gateway with real node processes on 127.0.0.1, discovered over mDNS."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import load_private_key
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_node.launcher import node_id
from tests.integration.conftest import SignedModel, make_signed_model

pytestmark = [pytest.mark.integration, pytest.mark.mdns]
# Branches (2, 3): every branch served, 0:0, 1:1 and 1:2 on two nodes each.
LAYOUT = ("0:0,1:0", "0:1,1:1", "0:0,1:2", "1:1,1:2")
PROMPT = "Shall I"


@pytest.fixture(scope="module")
def model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer, tiny_config
) -> SignedModel:
    cfg = replace(tiny_config, context_length=256)  # long generations without a window restart
    return make_signed_model(tmp_path_factory.mktemp("agg"), cfg, tiny_tokenizer)


@dataclass
class Cluster:
    model: SignedModel
    nodes: list[ManagedProcess]
    gateway: ManagedProcess
    stub: gw_grpc.GatewayServiceStub
    metrics_url: str
    start_node: Callable[[str], ManagedProcess]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_for(
        self, predicate: Callable[[gw.StatusResponse], bool], timeout_s: float = 20
    ) -> gw.StatusResponse:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.stub.Status(gw.StatusRequest(), timeout=5)
            if predicate(status):
                return status
            time.sleep(0.1)
        raise TimeoutError(f"cluster did not reach the expected state: {status}")


def _cluster(
    model: SignedModel, *gateway_args: str, node_args: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    started: list[ManagedProcess] = []

    def start_node(serve: str) -> ManagedProcess:
        args = model.node_args(serve, "--interface", "127.0.0.1", *node_args)
        node = start_process("mbt_node.cli", args)
        started.append(node)
        return node

    try:
        nodes = [start_node(s) for s in LAYOUT]
        gateway = start_process(
            "mbt_aggregator.cli", model.gateway_args("--interface", "127.0.0.1", *gateway_args)
        )
        started.append(gateway)
        url = re.search(r"metrics on (\S+)", gateway.ready_line).group(1).rstrip(",")
        channel = grpc.insecure_channel(gateway.address)
        cluster = Cluster(
            model, nodes, gateway, gw_grpc.GatewayServiceStub(channel), url, start_node
        )
        cluster.wait_for(lambda s: len(s.nodes) == len(LAYOUT))
        yield cluster
        channel.close()
    finally:
        for p in started:
            p.kill()


@pytest.fixture()
def cluster(model: SignedModel) -> Iterator[Cluster]:
    yield from _cluster(model)


def _in_process(model: SignedModel, n: int) -> list[int]:
    tok = Tokenizer.from_json(model_tokenizer(model))
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False)
    return [t for t, _ in generate(model.model, tok.encode(PROMPT), cfg)]


def model_tokenizer(model: SignedModel) -> str:
    from mbt_core.artifacts.load import load_trunk
    from mbt_core.artifacts.manifest import read_manifest

    return load_trunk(model.directory, read_manifest(model.directory)).tokenizer.to_json()


def _outcomes(event: gw.GenerateEvent, layer: int) -> dict[int, tuple[int, str]]:
    return {b.branch: (b.outcome, b.node_id) for b in event.layers[layer].branches}


def test_healthy_greedy_generation_equals_in_process(cluster: Cluster) -> None:
    events = list(
        cluster.stub.Generate(
            gw.GenerateRequest(prompt=PROMPT, max_new_tokens=30, temperature=0), timeout=60
        )
    )
    assert [e.token_id for e in events] == _in_process(cluster.model, 30)[: len(events)]
    for e in events:
        assert all(b.outcome == gw.OUTCOME_OK for layer in e.layers for b in layer.branches)
    status = cluster.stub.Status(gw.StatusRequest(), timeout=5)
    assert {(b.layer, b.branch): b.live_replicas for b in status.branches} == {
        (0, 0): 2,
        (0, 1): 1,
        (1, 0): 1,
        (1, 1): 2,
        (1, 2): 2,
    }
    samples = cluster.metrics()
    assert samples[("mbt_tokens_generated_total", ())] >= len(events)
    names = {name for name, _ in samples}
    for series in (
        "mbt_branch_call_seconds_bucket",
        "mbt_layer_step_seconds_bucket",
        "mbt_time_to_first_token_seconds_bucket",
        "mbt_token_seconds_bucket",
        "mbt_branch_calls_total",
        "mbt_nodes_admitted_total",
        "mbt_live_replicas",
        "mbt_width_diagnostic",
        "mbt_lost_weight_ratio_bucket",
        "mbt_lost_weight_total",
    ):
        assert series in names, series


def test_sigkill_mid_generation_masks_the_branch(cluster: Cluster) -> None:
    victim = cluster.nodes[1]  # the only replica of 0:1
    events = []
    for event in cluster.stub.Generate(
        gw.GenerateRequest(prompt=PROMPT, max_new_tokens=40, temperature=0), timeout=60
    ):
        events.append(event)
        if event.index == 4:
            victim.kill()
    assert len(events) == 40  # the generation completed
    masked = [e.index for e in events if _outcomes(e, 0)[1][0] == gw.OUTCOME_MASKED]
    assert masked and min(masked) >= 5
    assert all(_outcomes(e, 0)[1][0] == gw.OUTCOME_OK for e in events[:5])
    after = events[masked[0]]
    assert after.layers[0].lost_weight > 0
    # 1:1 has a second replica: it stays answered
    assert all(_outcomes(e, 1)[1][0] == gw.OUTCOME_OK for e in events)
    samples = cluster.metrics()
    key = ("mbt_masked_branches_total", (("branch", "1"), ("layer", "0"), ("reason", "masked")))
    assert samples[key] >= len(masked)


@pytest.fixture()
def slow_cluster(model: SignedModel) -> Iterator[Cluster]:
    """Every Forward takes 25 ms more: a generation lasts long enough to restart a node."""
    yield from _cluster(model, node_args=("--delay-ms", "25"))


def test_restarted_node_is_readmitted_and_replayed(slow_cluster: Cluster) -> None:
    cluster = slow_cluster
    victim = cluster.nodes[1]
    old_id = node_id(victim)
    events, new_id = [], None
    stream = cluster.stub.Generate(
        gw.GenerateRequest(prompt=PROMPT, max_new_tokens=240, temperature=0), timeout=120
    )
    for event in stream:
        events.append(event)
        if event.index == 3:
            victim.kill()
        if event.index == 8:
            new_id = node_id(cluster.start_node(LAYOUT[1]))
    assert len(events) == 240
    users = [_outcomes(e, 0)[1] for e in events]
    assert users[0] == (gw.OUTCOME_OK, old_id)
    assert any(o == gw.OUTCOME_MASKED for o, _ in users)
    back = [i for i, u in enumerate(users) if u == (gw.OUTCOME_OK, new_id)]
    assert back, (users[-3:], new_id, cluster.gateway.all_output()[-2000:])
    assert all(users[i][1] == new_id for i in range(back[0], len(users)))
    replays = sum(
        v for (name, _), v in cluster.metrics().items() if name == "mbt_cache_replays_total"
    )
    assert replays >= 1  # its empty cache was filled from the session's stored inputs


def test_node_with_another_manifest_is_rejected(cluster: Cluster, tmp_path: Path) -> None:
    model = cluster.model
    other = tmp_path / "other"
    tok = Tokenizer.from_json(model_tokenizer(model))
    manifest = export_artifacts(Checkpoint(model.model, tok), other, expires_days=30)
    sign_manifest(other, manifest, load_private_key(model.key.private_path))
    # Same model and version, another digest, on a machine of its own (its own rollback state).
    rogue = replace(model, directory=other, state_dir=tmp_path / "rogue-state")
    rogue_node = start_process("mbt_node.cli", rogue.node_args("0:1", "--interface", "127.0.0.1"))
    try:
        deadline = time.monotonic() + 15
        key = ("mbt_nodes_rejected_total", (("reason", "manifest"),))
        while cluster.metrics().get(key, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.metrics().get(key, 0) >= 1
        status = cluster.stub.Status(gw.StatusRequest(), timeout=5)
        assert node_id(rogue_node) not in {n.node_id for n in status.nodes}
    finally:
        rogue_node.kill()


def test_sigstop_with_deadline_policy(model: SignedModel) -> None:
    deadline_ms = 250
    for cluster in _cluster(model, "--policy", "deadline", "--deadline-ms", str(deadline_ms)):
        victim = cluster.nodes[1]  # the only replica of 0:1
        events = []
        stopped_at = resumed_at = None
        for event in cluster.stub.Generate(
            gw.GenerateRequest(prompt=PROMPT, max_new_tokens=60, temperature=0), timeout=120
        ):
            events.append(event)
            if event.index == 5:
                victim.signal(signal.SIGSTOP)
                stopped_at = 6
            if event.index == 15:
                victim.signal(signal.SIGCONT)
                resumed_at = 16
        assert len(events) == 60
        paused = events[stopped_at:resumed_at]
        assert all(_outcomes(e, 0)[1][0] == gw.OUTCOME_MASKED for e in paused[1:])
        budget_ms = 2 * deadline_ms + 500  # two layers, each bounded by the deadline, + margin
        assert max(e.latency_ms for e in paused) < budget_ms
        used_again = [
            e.index for e in events[resumed_at:] if _outcomes(e, 0)[1][0] == gw.OUTCOME_OK
        ]
        assert used_again, "the resumed node was never used again"
        _check_against_masked_reference(model, events)


def test_killed_replica_fails_over_without_masking(cluster: Cluster) -> None:
    """Node 2 holds 0:0 and 1:2, both also on other nodes: after SIGKILL every step still has
    all branches (the calls fail over), so the tokens stay exactly the in-process ones."""
    events = []
    for event in cluster.stub.Generate(
        gw.GenerateRequest(prompt=PROMPT, max_new_tokens=30, temperature=0), timeout=60
    ):
        events.append(event)
        if event.index == 5:
            cluster.nodes[2].kill()
    assert [e.token_id for e in events] == _in_process(cluster.model, 30)
    killed = node_id(cluster.nodes[2])
    for e in events[7:]:
        for layer in e.layers:
            assert all(b.outcome == gw.OUTCOME_OK for b in layer.branches), e
            assert all(b.node_id != killed for b in layer.branches)


def test_hedging_routes_around_a_paused_replica(model: SignedModel) -> None:
    """With --hedge, a paused primary replica costs one hedge delay per step, not the request
    timeout, and nothing is masked: the tokens stay exactly the in-process ones."""
    timeout_s = 5.0
    for cluster in _cluster(model, "--hedge", "--request-timeout-s", str(timeout_s)):
        ids = {node_id(n): i for i, n in enumerate(cluster.nodes)}
        events, victim = [], None
        for event in cluster.stub.Generate(
            gw.GenerateRequest(prompt=PROMPT, max_new_tokens=40, temperature=0), timeout=120
        ):
            events.append(event)
            if event.index == 5:
                # Layer 1 branch 2 lives on nodes 2 and 3, whose branches all have a second
                # replica: pause the one that answers it now.
                victim = ids[_outcomes(event, 1)[2][1]]
                cluster.nodes[victim].signal(signal.SIGSTOP)
            if event.index == 15:
                cluster.nodes[victim].signal(signal.SIGCONT)
        assert victim in (2, 3)
        assert [e.token_id for e in events] == _in_process(model, 40)
        paused = events[6:16]
        assert max(e.latency_ms for e in paused) < timeout_s * 1000 / 2
        hedged = [
            b
            for e in paused
            for layer in e.layers
            for b in layer.branches
            if b.hedged and b.outcome == gw.OUTCOME_OK
        ]
        assert hedged, "no step was answered by a hedge"
        assert all(ids[b.node_id] != victim for b in hedged)
        assert all(b.outcome == gw.OUTCOME_OK for e in events for b in e.layers[1].branches)
        hedge_count = sum(
            v for (name, _), v in cluster.metrics().items() if name == "mbt_hedged_calls_total"
        )
        # Every hedge the tokens report is counted. Not every paused step needs one: once the
        # hedges' answers make the other replica the faster one, it becomes the primary.
        assert hedge_count >= len(hedged)


def _check_against_masked_reference(model: SignedModel, events: list[gw.GenerateEvent]) -> None:
    """Replay the generation in process with the same per-step masks, every branch cached.

    If a late answer had corrupted the paused node's cache, the distributed tokens after the
    node came back would differ from this reference.
    """
    tok = Tokenizer.from_json(model_tokenizer(model))
    ids = tok.encode(PROMPT)
    cache = model.model.new_cache()
    pending = ids
    with torch.no_grad():
        for e in events:
            masks = [
                torch.tensor([[b.outcome == gw.OUTCOME_OK] for b in layer.branches])
                for layer in e.layers
            ]  # (K, 1): every branch computed, masked ones unused
            logits = model.model(torch.tensor([pending]), masks=masks, cache=cache)
            assert int(logits[0, -1].argmax()) == e.token_id, f"token {e.index} differs"
            pending = [e.token_id]


def test_cli_generate_and_eval_through_the_gateway(cluster: Cluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    model = cluster.model
    common = ["--greedy", "--max-new-tokens", "12"]
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_core.cli",
            "generate",
            PROMPT,
            "--artifacts",
            str(model.directory),
            "--trusted-key",
            str(model.key.public_path),
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**__import__("os").environ, "MBT_STATE_DIR": str(tmp_path)},
    )
    remote = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_core.cli",
            "generate",
            PROMPT,
            "--gateway",
            cluster.gateway.address,
            "--show-branches",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert remote.stdout == local.stdout
    assert "[token 0] L0:11 L1:111" in remote.stderr
    text = tmp_path / "t.txt"
    text.write_text("Shall I compare thee to a summer's day? " * 8)
    scored = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_core.cli",
            "eval",
            str(text),
            "--gateway",
            cluster.gateway.address,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import json

    report = json.loads(scored.stdout)
    assert report["tokens"] > 10 and report["masked_branch_steps"] == 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_core.cli",
            "generate",
            "x",
            "--gateway",
            "127.0.0.1:1",
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "UNAVAILABLE" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
