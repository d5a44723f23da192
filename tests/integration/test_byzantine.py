"""Byzantine branch nodes (real processes with ``--unsafe-test-fault``) under each defense.

The shipped model is exported with calibrated output-norm bounds and signed. One branch
(layer 1, branch 2) is served by healthy replicas and by one corrupting node per fault mode
(NaN, x1e4, sign flip, random direction of the same norm). A text is scored through an
engine over a chosen set of nodes, and the next-token distributions are compared with the
healthy model's by KL divergence (nats per position, mean over the scored positions).
``pytest -s`` prints the table; the slow sweep adds more defenses.

Two tests run the gateway process itself, from its command-line flags: a NaN node is rejected
and then quarantined; a flipping replica is outvoted by the 3-replica median, with greedy
tokens exactly the in-process ones.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mbt_aggregator.client import NodeClient
from mbt_aggregator.defense import AUDIT, MEDIAN, OFF, Defense, DefenseConfig
from mbt_aggregator.engine import Engine
from mbt_aggregator.generation import score
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, Registry
from mbt_core.artifacts.calibration import branch_norm_bounds, calibration_tokens
from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.manifest import NormBound
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.training.data import evaluation_texts
from mbt_core.trust.keys import generate_key, load_private_key
from mbt_core.wire.contract import format_branches, parse_branches
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_node.faults import ENABLE_ENV, MODES
from mbt_node.launcher import node_id

pytestmark = [pytest.mark.integration]
BAD = (1, 2)  # the branch the Byzantine nodes serve
SCORED_TOKENS = 257  # two context windows of the shipped model
PROMPT = "KING HENRY:"


@dataclass(frozen=True)
class Served:
    process: ManagedProcess
    node_id: str
    branches: frozenset[tuple[int, int]]


@dataclass
class Swarm:
    artifacts: Path
    public_key: Path
    state_dir: Path
    model: MBTLanguageModel
    tokenizer: Tokenizer
    bounds: dict[tuple[int, int], NormBound]
    nodes: dict[str, Served]  # "h0": all but BAD; "h1".."h3": BAD; "nan", "huge", ...: BAD
    ids: list[int]  # the scored text
    reference: torch.Tensor  # (positions, V): the healthy in-process log-probabilities


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("byzantine")
    ckpt = load_checkpoint(None)
    texts = evaluation_texts(None)
    bounds = branch_norm_bounds(ckpt.model, calibration_tokens(ckpt.tokenizer, texts))
    key = generate_key(root / "keys", "owner")
    manifest = export_artifacts(ckpt, root / "artifacts", norm_bounds=bounds)
    sign_manifest(root / "artifacts", manifest, load_private_key(key.private_path))
    (root / "state").mkdir()
    every = {(li, b) for li, k in enumerate(ckpt.model.cfg.branches) for b in range(k)}
    layout = {"h0": format_branches(tuple(sorted(every - {BAD})))}
    layout |= {name: f"{BAD[0]}:{BAD[1]}" for name in ("h1", "h2", "h3", *MODES)}

    def start(name: str) -> Served:
        args = [
            "--artifacts",
            str(root / "artifacts"),
            "--trusted-key",
            str(key.public_path),
            "--state-file",
            str(root / "state" / f"{name}.json"),
            "--serve",
            layout[name],
            "--no-advertise",
            "--insecure",
        ]
        env = {}
        if name in MODES:
            args += ["--unsafe-test-fault", f"corrupt={name},seed=1"]
            env = {ENABLE_ENV: "1"}
        proc = start_process("mbt_node.cli", args, 60.0, env)
        return Served(proc, node_id(proc), frozenset(parse_branches(layout[name])))

    # Middle of Macbeth: text the bounds were not calibrated on.
    ids = ckpt.tokenizer.encode(texts[-1][60_000:70_000])[:SCORED_TOKENS]
    nodes: dict[str, Served] = {}
    try:
        with ThreadPoolExecutor(4) as pool:
            nodes = dict(zip(layout, pool.map(start, layout), strict=True))
        yield Swarm(
            root / "artifacts",
            key.public_path,
            root / "state",
            ckpt.model,
            ckpt.tokenizer,
            bounds,
            nodes,
            ids,
            _in_process_logprobs(ckpt.model, ids),
        )
    finally:
        for served in nodes.values():
            served.process.kill()


def _in_process_logprobs(model: MBTLanguageModel, ids: list[int]) -> torch.Tensor:
    """What ``score`` computes, in one process: log-softmax per window of the context."""
    window, rows = model.cfg.context_length, []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            rows.append(torch.log_softmax(model(torch.tensor([chunk[:-1]]))[0].float(), -1))
    return torch.cat(rows)


@dataclass(frozen=True)
class Run:
    kl: float  # mean KL(healthy || this run) per position, nats
    exact: bool  # bit for bit the healthy distributions
    rejected: float  # branch output rows refused (all reasons)


def _run(
    swarm: Swarm,
    names: tuple[str, ...],
    defense: Defense,
    aggregation: AggregationConfig | None = None,
) -> Run:
    """Score the text through an engine over the nodes ``names``; compare with healthy."""
    trunk = swarm.model  # the in-process model's trunk: the same tensors the gateway loads

    async def main() -> torch.Tensor:
        registry = Registry()
        for name in names:
            served = swarm.nodes[name]
            client = NodeClient(served.process.address)
            registry.add(Node(served.node_id, served.process.address, client, served.branches))
        engine = Engine(
            trunk,
            registry,
            FanoutPolicy(request_timeout_s=20),
            aggregation or AggregationConfig(),
            metrics,
            None,
            defense,
        )
        try:
            result = await score(engine, swarm.ids, return_logprobs=True)
            assert result.logprobs is not None
            return result.logprobs
        finally:
            await engine.close()
            for node in registry.nodes:
                await node.client.close()

    metrics = Metrics(CollectorRegistry())
    logprobs = asyncio.run(main())
    ref = swarm.reference
    kl = float((ref.exp() * (ref - logprobs)).sum(-1).mean())
    rejected = sum(
        s.value
        for family in metrics.registry.collect()
        if family.name == "mbt_rejected_outputs"
        for s in family.samples
        if s.name.endswith("_total")
    )
    return Run(kl, torch.equal(logprobs, ref), rejected)


def _bounds(swarm: Swarm, **kw: object) -> Defense:
    return Defense(DefenseConfig(**kw), swarm.bounds)  # type: ignore[arg-type]


# Defense name -> (nodes besides h0 serving the bad branch, with {bad} the Byzantine one, the
# defense, the aggregation). "none": only the finiteness check (always on) and no norm check.
DEFENSES = {
    "none": (("{bad}",), lambda s: Defense.off(), AggregationConfig(norm_factor=None)),
    "bounds": (("{bad}",), lambda s: _bounds(s, replica_check=OFF), None),
    "median3": (("h1", "h2", "{bad}"), lambda s: _bounds(s, replica_check=MEDIAN), None),
}
SLOW_DEFENSES = {
    "norm_factor": (("{bad}",), lambda s: Defense.off(), AggregationConfig()),
    "audit1.0": (
        ("h1", "{bad}"),
        lambda s: _bounds(s, replica_check=AUDIT, audit_rate=1.0, audit_seed=0),
        None,
    ),
    "xbranch_median": (("{bad}",), lambda s: Defense.off(), AggregationConfig(mode="median")),
    "xbranch_trimmed": (("{bad}",), lambda s: Defense.off(), AggregationConfig(mode="trimmed")),
}


def _table(swarm: Swarm, defenses: dict) -> dict[tuple[str, str], Run]:  # type: ignore[type-arg]
    runs: dict[tuple[str, str], Run] = {}
    for name, (others, make, aggregation) in defenses.items():
        healthy = tuple(o.replace("{bad}", "h3") for o in others)
        runs[("healthy", name)] = _run(swarm, ("h0", *healthy), make(swarm), aggregation)
        for mode in MODES:
            nodes = ("h0", *(o.replace("{bad}", mode) for o in others))
            runs[(mode, name)] = _run(swarm, nodes, make(swarm), aggregation)
    runs[("masked", "-")] = _run(swarm, ("h0",), Defense.off())  # the branch simply missing
    print(f"\nKL(healthy || run), nats per position over {len(swarm.ids) - 1} positions:")
    print(f"{'fault':<8}" + "".join(f"{d:>16}" for d in defenses))
    for mode in ("healthy", *MODES):
        cells = [runs[(mode, d)] for d in defenses]
        print(f"{mode:<8}" + "".join(f"{r.kl:>16.3g}" for r in cells))
    print(f"branch {BAD[0]}:{BAD[1]} masked outright: {runs[('masked', '-')].kl:.3g}")
    return runs


def test_byzantine_node_under_each_defense(swarm: Swarm) -> None:
    runs = _table(swarm, DEFENSES)
    masked = runs[("masked", "-")].kl
    assert masked > 0
    for defense in DEFENSES:  # every defense leaves a healthy swarm bit for bit as it was
        assert runs[("healthy", defense)].exact, defense
    for mode in MODES:
        # Three replicas, one Byzantine: the median is exactly the healthy output.
        assert runs[(mode, "median3")].exact, mode
        assert runs[(mode, "median3")].rejected > 0, mode
    for mode in ("nan", "huge"):
        # The bounds reject the branch: exactly as if it were missing.
        assert runs[(mode, "bounds")].kl == pytest.approx(masked, rel=1e-6), mode
    # NaN is refused even with no defense; the others go through and do real damage.
    assert runs[("nan", "none")].kl == pytest.approx(masked, rel=1e-6)
    for mode in ("huge", "flip", "random"):
        assert runs[(mode, "none")].kl > 5 * masked, mode
    # A flipped sign or a random direction keeps the norm: the bounds alone cannot see them.
    for mode in ("flip", "random"):
        assert runs[(mode, "bounds")].rejected == 0, mode


@pytest.mark.slow
def test_byzantine_sweep_of_every_defense(swarm: Swarm) -> None:
    runs = _table(swarm, SLOW_DEFENSES)
    masked = runs[("masked", "-")].kl
    for mode in ("nan", "huge"):  # the bounds tell which replica of the pair is wrong
        assert runs[(mode, "audit1.0")].exact, mode
    for mode in ("flip", "random"):  # a pair that disagrees at every step: the branch is masked
        assert runs[(mode, "audit1.0")].kl == pytest.approx(masked, rel=1e-6), mode
    # Cross-branch robust modes change the output of a healthy swarm: not a defense.
    assert runs[("healthy", "xbranch_median")].kl > 0


def _gateway(swarm: Swarm, names: tuple[str, ...], *flags: str) -> ManagedProcess:
    peers = ",".join(swarm.nodes[n].process.address for n in names)
    return start_process(
        "mbt_aggregator.cli",
        [
            "--artifacts",
            str(swarm.artifacts),
            "--trusted-key",
            str(swarm.public_key),
            "--state-file",
            str(swarm.state_dir / "gateway.json"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--insecure",
            "--no-mdns",
            "--peers",
            peers,
            *flags,
        ],
    )


def _metrics(gateway: ManagedProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = re.search(r"metrics on (\S+)", gateway.ready_line).group(1).rstrip(",")  # type: ignore[union-attr]
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _admitted(stub: gw_grpc.GatewayServiceStub, n: int) -> gw.StatusResponse:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = stub.Status(gw.StatusRequest(), timeout=5)
        if len(status.nodes) == n:
            return status
        time.sleep(0.1)
    raise TimeoutError(f"{n} nodes not admitted: {status}")


def _greedy(swarm: Swarm, n: int, masks: list[torch.Tensor] | None = None) -> list[int]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eos=False)
    return [t for t, _ in generate(swarm.model, swarm.tokenizer.encode(PROMPT), cfg, masks)]


def _generate(stub: gw_grpc.GatewayServiceStub, n: int) -> list[gw.GenerateEvent]:
    request = gw.GenerateRequest(prompt=PROMPT, max_new_tokens=n, temperature=0)
    return list(stub.Generate(request, timeout=120))


def test_gateway_rejects_then_quarantines_a_nan_node(swarm: Swarm) -> None:
    gateway = _gateway(swarm, ("h0", "nan"), "--quarantine-strikes", "3")
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)
            _admitted(stub, 2)
            events = _generate(stub, 12)
            status = stub.Status(gw.StatusRequest(), timeout=5)
        outcomes = [e.layers[BAD[0]].branches[BAD[1]].outcome for e in events]
        # Rejected three times (the prompt's prefill and two tokens), then quarantined.
        assert outcomes[:3] == [gw.OUTCOME_REJECTED] * 3
        assert set(outcomes[3:]) == {gw.OUTCOME_MASKED}
        k = swarm.model.cfg.branches
        masks = [torch.ones(n, dtype=torch.bool) for n in k]
        masks[BAD[0]][BAD[1]] = False
        assert [e.token_id for e in events] == _greedy(swarm, 12, masks)
        bad = swarm.nodes["nan"].node_id
        assert {n.node_id: n.healthy for n in status.nodes}[bad] is False
        samples = _metrics(gateway)
        labels = (("branch", str(BAD[1])), ("layer", str(BAD[0])), ("reason", "non_finite"))
        assert samples[("mbt_rejected_outputs_total", labels)] >= 3
        assert samples[("mbt_node_quarantines_total", ())] == 1
        assert samples[("mbt_quarantined_nodes", ())] == 1
        assert "quarantined node" in gateway.all_output()
    finally:
        gateway.kill()


def test_gateway_median_outvotes_a_flipping_replica(swarm: Swarm) -> None:
    gateway = _gateway(swarm, ("h0", "h1", "h2", "flip"), "--replica-check", "median")
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)
            _admitted(stub, 4)
            events = _generate(stub, 12)
        assert [e.token_id for e in events] == _greedy(swarm, 12)  # exactly the healthy tokens
        assert all(
            b.outcome == gw.OUTCOME_OK for e in events for la in e.layers for b in la.branches
        )
        samples = _metrics(gateway)
        labels = (("branch", str(BAD[1])), ("layer", str(BAD[0])), ("reason", "outvoted"))
        assert samples[("mbt_rejected_outputs_total", labels)] >= 3
        assert samples[("mbt_node_quarantines_total", ())] == 1
    finally:
        gateway.kill()
