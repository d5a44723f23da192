"""The outage benchmark: baseline, then every policy x scenario on one cluster, then a sweep.

One cluster serves the whole benchmark. Before each run the nodes are brought back to what the
scenario needs (only dead nodes, or nodes whose start options differ, are restarted) and the
gateway is restarted when the policy changes or the previous run disturbed it, so every run
starts from a healthy cluster with a fresh registry; a short warm-up generation opens the
channels. The sweep then kills nodes one after another and scores the text after each kill:
quality against the fraction of branches lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from tqdm import tqdm

from mbt_aggregator.outage.baseline import Baseline, run_baseline
from mbt_aggregator.outage.faults import Disruptor, Injector, NodeSetup, node_setups
from mbt_aggregator.outage.netns import NetnsLab, require_root
from mbt_aggregator.outage.ramp import sample_ramp
from mbt_aggregator.outage.report import RunResult, kl_divergence, percentile, summarize
from mbt_aggregator.outage.scenario import FaultEvent, Scenario
from mbt_aggregator.outage.workload import (
    RunRecord,
    ScoreRecord,
    Workload,
    channel_options,
    perplexity_text,
    run_workload,
    score_text,
)
from mbt_core.artifacts.export import EXPANSION_INFO
from mbt_core.artifacts.load import load_model_from_artifacts
from mbt_core.artifacts.manifest import Expansion
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.model.checkpoint import Checkpoint, load_checkpoint
from mbt_core.model.expand import expand_model
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

POLICY_MODES = ("all", "quorum", "deadline")
HEDGE_SUFFIX = "+hedge"


def check_policy(name: str) -> str:
    mode = name.removesuffix(HEDGE_SUFFIX)
    if mode not in POLICY_MODES:
        raise ValueError(
            f"unknown policy {name!r}: one of {', '.join(POLICY_MODES)}, each optionally "
            f"with {HEDGE_SUFFIX}"
        )
    return name


@dataclass(frozen=True)
class BenchConfig:
    layout: Layout
    policies: tuple[str, ...]
    scenarios: tuple[Scenario, ...]
    workload: Workload
    seed: int = 0
    checkpoint: Path | None = None
    artifacts: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    netns: bool = False
    request_timeout_s: float = 1.0  # the gateway's per-call bound: how long "all" waits
    deadline_ms: float = 40.0
    quorum_weight: float = 0.7
    sweep: bool = True
    progress: bool = True
    expand_checkpoint: Path | None = None  # what an expand scenario publishes (mbt expand)

    def __post_init__(self) -> None:
        for policy in self.policies:
            check_policy(policy)
        if not self.policies or not self.scenarios:
            raise ValueError("at least one policy and one scenario are needed")
        for s in self.scenarios:
            if s.expands and self.artifacts is not None:
                raise ValueError(
                    f"scenario {s.name}: an expansion is signed with the bench's own key; "
                    "it cannot grow a given --artifacts export (use --checkpoint)"
                )
            if s.needs_netns and not self.netns:
                raise ValueError(f"scenario {s.name} ({s.source}) needs --netns")
            if s.last_fault_s() >= self.workload.duration_s:
                raise ValueError(
                    f"scenario {s.name} ({s.source}): a fault at {s.last_fault_s():g} s is past "
                    f"the workload's duration of {self.workload.duration_s:g} s"
                )

    def gateway_args(self, policy: str) -> tuple[str, ...]:
        mode = policy.removesuffix(HEDGE_SUFFIX)
        args = ["--policy", mode, "--request-timeout-s", f"{self.request_timeout_s:g}"]
        args += ["--expand-probe-interval", "0.5", "--watch-artifacts", "0"]  # expand: SIGHUP
        if mode == "quorum":
            args += ["--quorum-weight", f"{self.quorum_weight:g}"]
        if mode == "deadline":
            args += ["--deadline-ms", f"{self.deadline_ms:g}"]
        if policy.endswith(HEDGE_SUFFIX):
            args.append("--hedge")
        return tuple(args)


@dataclass
class BenchResult:
    baseline: Baseline
    scenarios: list[Scenario] = field(default_factory=list)  # random nodes drawn
    runs: list[RunResult] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def load_model(cfg: BenchConfig) -> Checkpoint:
    """The model of the baseline: the checkpoint, or the verified artifacts the nodes serve."""
    if cfg.artifacts is None:
        return load_checkpoint(cfg.checkpoint)
    if not cfg.trusted_keys:
        raise ValueError("--artifacts needs at least one --trusted-key")
    with tempfile.TemporaryDirectory(prefix="mbt-bench-") as state:  # no lasting rollback state
        return load_model_from_artifacts(
            cfg.artifacts, list(cfg.trusted_keys), 1, Path(state) / "state.json"
        )


def run_outage(cfg: BenchConfig) -> BenchResult:
    t_start = time.perf_counter()
    if cfg.netns:
        require_root()
    torch.set_num_threads(1)  # the nodes and the gateway share this machine
    n_runs = len(cfg.policies) * len(cfg.scenarios)
    bar = tqdm(
        total=n_runs + 2 + int(cfg.sweep),
        desc="baseline",
        unit="step",
        file=sys.stderr,
        disable=not cfg.progress,
    )
    with bar:
        ckpt = load_model(cfg)
        baseline = run_baseline(ckpt, cfg.workload)
        result = BenchResult(baseline)
        bar.update()
        n_nodes = len([s for s in cfg.layout.assign(ckpt.model.cfg.branches) if s])
        scenarios = result.scenarios = [s.resolve(n_nodes, cfg.seed) for s in cfg.scenarios]
        ids = ckpt.tokenizer.encode(perplexity_text(cfg.workload.text_chars))
        window = ckpt.model.cfg.context_length
        branch_steps = -(-(len(ids) - 1) // window) * sum(ckpt.model.cfg.branches)
        expected = baseline.outputs
        with contextlib.ExitStack() as stack:
            bar.set_description("starting the cluster")
            lab = stack.enter_context(NetnsLab(n_nodes)) if cfg.netns else None
            net_args = ("--interface", lab.gateway_ip) if lab else ()
            cluster = stack.enter_context(
                LocalCluster(
                    cfg.checkpoint,
                    cfg.layout,
                    gateway_args=(*cfg.gateway_args(cfg.policies[0]), *net_args),
                    artifacts=cfg.artifacts,
                    trusted_keys=cfg.trusted_keys,
                    placements=tuple(lab.placement(i) for i in range(n_nodes)) if lab else (),
                    # Plaintext on this machine, as the figures in the README were measured
                    # (mbt-bench soak runs the default, mutual TLS).
                    tls=False,
                )
            )
            injector = Injector(cluster, lab, grower(cfg, ckpt))
            bar.update()
            policy_now, dirty = cfg.policies[0], False
            for policy in cfg.policies:
                for scenario in scenarios:
                    bar.set_description(f"{scenario.name} / {policy}")
                    setups = node_setups(scenario, n_nodes, cfg.seed)
                    dirty |= injector.restore(setups) > 0
                    if dirty or policy != policy_now:
                        cluster.restart_gateway((*cfg.gateway_args(policy), *net_args))
                        policy_now = policy
                    wait_healthy(cluster, cfg.layout.replicas)
                    warm_up(cluster.address, cfg.workload)
                    node_ids = [{i} for i in cluster.node_ids]
                    record, disruptor = asyncio.run(
                        _one_run(cluster.address, injector, scenario, node_ids, cfg.workload)
                    )
                    result.runs.append(
                        summarize(
                            scenario.name,
                            policy,
                            record,
                            disruptor.episodes,
                            disruptor.markers,
                            node_ids,
                            baseline.logprobs,
                            expected,
                            cfg.workload.max_new_tokens,
                            branch_steps,
                        )
                    )
                    dirty = not scenario.healthy
                    if scenario.expands:  # the next run starts from the old model again
                        cluster.revert_expansion()
                    bar.update()
            if cfg.sweep:
                bar.set_description("sweep: kill 0..k nodes")
                injector.restore([NodeSetup() for _ in range(n_nodes)])
                cluster.restart_gateway((*cfg.gateway_args("all"), *net_args))
                wait_healthy(cluster, cfg.layout.replicas)
                result.sweep = sweep(cluster, cfg.workload, baseline.logprobs, branch_steps)
                bar.update()
    result.wall_s = time.perf_counter() - t_start
    return result


def grower(cfg: BenchConfig, served: Checkpoint) -> Callable[[FaultEvent], Checkpoint]:
    """What an ``expand`` event publishes: ``--expand-checkpoint`` (a model ``mbt expand``
    grew from the served one), or the served model grown untrained (noisy copies of its
    branches, :func:`~mbt_core.model.expand.expand_model`); with the event's ramp."""

    def grow(e: FaultEvent) -> Checkpoint:
        if cfg.expand_checkpoint is not None:
            grown = load_checkpoint(cfg.expand_checkpoint)
        else:
            layers = range(served.model.cfg.n_layers)
            model = expand_model(served.model, layers, e.add, init="copy", seed=cfg.seed)
            grown = Checkpoint(model, served.tokenizer, dict(served.info))
        schedule = Expansion(served.model.cfg.branches, 0.0, 1.0, e.ramp_s)
        info = {**grown.info, EXPANSION_INFO: json.dumps(schedule.to_dict())}
        return Checkpoint(grown.model, grown.tokenizer, info)

    return grow


async def _one_run(
    address: str,
    injector: Injector,
    scenario: Scenario,
    node_ids: list[set[str]],
    workload: Workload,
) -> tuple[RunRecord, Disruptor]:
    disruptor = Disruptor(injector, scenario, node_ids)
    t0 = time.perf_counter()
    disruptor.start(t0)
    stop = asyncio.Event()
    sampler = None
    if scenario.expands:
        sampler = asyncio.create_task(sample_ramp(address, t0, stop))
    try:
        record = await run_workload(
            address, workload, t0, disruptor.fault_applied, disruptor.settled
        )
    finally:
        await disruptor.cancel()
        stop.set()
    record.ramp = [asdict(s) for s in await sampler] if sampler is not None else []
    return record, disruptor


def wait_healthy(cluster: LocalCluster, replicas: int, timeout_s: float = 60.0) -> None:
    """Until the gateway has admitted every current node and every branch has all replicas."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = cluster.status()
        healthy = {n.node_id for n in status.nodes if n.healthy}
        if (
            set(cluster.node_ids) <= healthy
            and status.branches
            and all(b.live_replicas >= replicas for b in status.branches)
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster did not become healthy within {timeout_s:g} s")
        time.sleep(0.1)


def warm_up(address: str, workload: Workload) -> None:
    """One short generation: channels open, every replica has a latency estimate."""
    with grpc.insecure_channel(address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        request = gw.GenerateRequest(prompt=workload.prompts[0], max_new_tokens=2)
        for _ in stub.Generate(request, timeout=workload.request_timeout_s):
            pass


def sweep(
    cluster: LocalCluster, workload: Workload, reference: np.ndarray, branch_steps: int
) -> list[dict[str, Any]]:
    """Score the text with nodes 0..k-1 killed, for k = 0 .. nodes - 1."""
    rows = []
    for k in range(len(cluster.nodes)):
        if k:
            cluster.kill_node(k - 1)
        score = asyncio.run(_score(cluster.address, workload))
        row: dict[str, Any] = {"nodes_killed": k, "error": score.error}
        if score.logprobs is not None:
            row.update(
                perplexity=score.perplexity,
                kl=kl_divergence(reference, score.logprobs),
                lost_fraction=score.masked_branch_steps / branch_steps,
            )
        rows.append(row)
        if score.error:
            break
    return rows


async def _score(address: str, workload: Workload) -> ScoreRecord:
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        return await score_text(gw_grpc.GatewayServiceStub(channel), workload, 0.0)


def payload(cfg: BenchConfig, result: BenchResult, quick: bool) -> dict[str, Any]:
    """Everything for the JSON file."""
    lat = [s * 1e3 for s in result.baseline.latencies_s]
    return {
        "config": {
            "quick": quick,
            "layout": asdict(cfg.layout),
            "policies": list(cfg.policies),
            "scenarios": [asdict(s) for s in result.scenarios],
            "workload": asdict(cfg.workload),
            "seed": cfg.seed,
            "netns": cfg.netns,
            "request_timeout_s": cfg.request_timeout_s,
            "deadline_ms": cfg.deadline_ms,
            "quorum_weight": cfg.quorum_weight,
        },
        "baseline": {
            "latency_p50_ms": percentile(lat, 50),
            "latency_p95_ms": percentile(lat, 95),
            "latency_p99_ms": percentile(lat, 99),
            "tokens_per_s": result.baseline.tokens_per_s,
            "tokens": len(lat),
            "perplexity": result.baseline.perplexity,
            "outputs": [list(o) for o in result.baseline.outputs],
        },
        "runs": [asdict(r) for r in result.runs],
        "sweep": result.sweep,
        "wall_s": result.wall_s,
    }
