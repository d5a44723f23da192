"""The churn soak: clients generate without pause while nodes are killed, restarted, paused and
resumed at random, over mutual TLS as a default cluster runs.

What must hold, and is reported: every request completes (0 failed), every completion equals
the in-process greedy tokens (0 mismatches: with two replicas per branch and one fault at a
time no branch is ever lost), the memory of every process stays bounded, and no session is
left on a node once the clients stop (the gateway ends every one, retrying nodes that were
away). A fault starts only once every branch has all its replicas live again, so that each
fault is one the layout can absorb.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from mbt_aggregator.outage.baseline import run_baseline
from mbt_aggregator.outage.workload import PROMPTS, Workload
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.cluster.process import memory_mib
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

FAULTS = ("kill", "pause")  # kill -> restart on the same port; pause -> resume
RSS_GROWTH_TARGET = 1.5  # end / start, for every process that ran the whole soak


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    clients: int = 4
    max_new_tokens: int = 16
    layout: Layout = field(default_factory=lambda: Layout(nodes=4, replicas=2))
    gap_s: tuple[float, float] = (0.5, 3.0)  # from a recovery (all replicas live) to the next
    hold_s: tuple[float, float] = (0.5, 4.0)  # how long a fault lasts
    seed: int = 0
    checkpoint: Path | None = None  # default: the shipped model
    request_timeout_s: float = 1.0  # the gateway's per-call bound before it fails over
    settle_s: float = 60.0  # at the end: how long the gateway may take to end every session
    progress: bool = True

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.clients <= 0 or self.max_new_tokens <= 0:
            raise ValueError("--duration-s, --clients and --max-new-tokens must be positive")
        if self.layout.replicas < 2:
            raise ValueError("the soak needs at least 2 replicas per branch (--replicas)")
        for lo, hi in (self.gap_s, self.hold_s):
            if not 0 <= lo <= hi:
                raise ValueError(f"a time range needs 0 <= low <= high, got {lo}..{hi}")


@dataclass
class Fault:
    at_s: float
    action: str
    node: int
    hold_s: float
    recovered_s: float = float("nan")  # when every replica was live again


@dataclass
class Requests:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    mismatches: int = 0
    masked: int = 0  # completions in which some branch step was masked or rejected
    tokens: int = 0
    mismatch_examples: list[str] = field(default_factory=list)  # a few, to diagnose
    errors: dict[str, int] = field(default_factory=dict)  # message -> count (a few kept)


@dataclass
class SoakResult:
    config: dict[str, Any]
    wall_s: float
    requests: Requests
    faults: list[Fault]
    rss_mib: dict[str, dict[str, Any]]  # process -> start, end, restarted
    sessions_left: int
    unended_at_end: float
    sessions_left_by_node: list[int] = field(default_factory=list)
    churn_error: str = ""
    gateway_log: str = field(default="", repr=False)

    def missed(self) -> list[str]:
        """The targets this run missed (empty: all met)."""
        out = []
        if self.requests.failed:
            out.append(f"{self.requests.failed} requests failed")
        if self.requests.mismatches:
            out.append(f"{self.requests.mismatches} greedy mismatches")
        if self.sessions_left:
            out.append(f"{self.sessions_left} sessions left on nodes")
        for name, r in self.rss_mib.items():
            if not r["restarted"] and r["end"] > RSS_GROWTH_TARGET * r["start"]:
                out.append(f"{name} RSS grew {r['end'] / r['start']:.2f}x")
        if self.churn_error:
            out.append(f"fault driver: {self.churn_error}")
        return out


def soak_doc() -> str:
    """``mbt-bench soak --help``: the module's account of what is run and what must hold."""
    return __doc__ or ""


class _Churn(threading.Thread):
    """One fault at a time, each once the layout is whole again; always recovers."""

    def __init__(self, cluster: LocalCluster, cfg: SoakConfig, t0: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.cfg, self.t0 = cluster, cfg, t0
        self.rng = random.Random(cfg.seed)
        self.stop = threading.Event()
        self.faults: list[Fault] = []
        self.error = ""

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(*self.cfg.gap_s)):
                self._one()
        except Exception as exc:  # reported; the soak then fails its targets
            self.error = f"{type(exc).__name__}: {exc}"

    def _one(self) -> None:
        i = self.rng.randrange(len(self.cluster.nodes))
        fault = Fault(
            time.perf_counter() - self.t0,
            self.rng.choice(FAULTS),
            i,
            self.rng.uniform(*self.cfg.hold_s),
        )
        self.faults.append(fault)
        if fault.action == "kill":
            self.cluster.kill_node(i)
            self.stop.wait(fault.hold_s)
            self.cluster.restart_node(i)
        else:
            self.cluster.pause_node(i)
            self.stop.wait(fault.hold_s)
            self.cluster.resume_node(i)
        self._wait_whole()
        fault.recovered_s = time.perf_counter() - self.t0

    def _wait_whole(self, timeout_s: float = 60.0) -> None:
        want = self.cfg.layout.replicas
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            branches = self.cluster.status().branches
            if branches and all(b.live_replicas >= want for b in branches):
                return
            time.sleep(0.1)
        raise TimeoutError(f"not every branch had {want} live replicas after {timeout_s:g} s")


async def _clients(
    cluster: LocalCluster,
    cfg: SoakConfig,
    expected: tuple[tuple[int, ...], ...],
    end: float,
    counts: Requests,
    rounds: int | None = None,
) -> None:
    """Each client sends the prompts in turn until ``end`` (or for ``rounds`` requests)."""
    async with cluster.credentials.aio_channel(cluster.address) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)

        async def client(c: int) -> None:
            turn = 0
            while time.perf_counter() < end or (rounds is not None and turn < rounds):
                p = (c + turn * cfg.clients) % len(PROMPTS)
                turn += 1
                counts.sent += 1
                request = gw.GenerateRequest(
                    prompt=PROMPTS[p], max_new_tokens=cfg.max_new_tokens, temperature=0.0
                )
                try:
                    events = [e async for e in stub.Generate(request, timeout=120)]
                except grpc.aio.AioRpcError as exc:
                    counts.failed += 1
                    message = f"{exc.code().name}: {exc.details()}"
                    if message in counts.errors or len(counts.errors) < 10:
                        counts.errors[message] = counts.errors.get(message, 0) + 1
                    await asyncio.sleep(0.2)
                    continue
                tokens = tuple(e.token_id for e in events)
                lost_steps = [
                    (i, layer.layer, b.branch, gw.Outcome.Name(b.outcome))
                    for i, e in enumerate(events)
                    for layer in e.layers
                    for b in layer.branches
                    if b.outcome != gw.OUTCOME_OK
                ]
                lost = sorted({i for i, *_ in lost_steps})
                counts.completed += 1
                counts.tokens += len(tokens)
                counts.masked += bool(lost)
                if tokens != expected[p]:
                    counts.mismatches += 1
                    if len(counts.mismatch_examples) < 10:
                        first = next(
                            (
                                i
                                for i, (a, b) in enumerate(zip(tokens, expected[p], strict=False))
                                if a != b
                            ),
                            min(len(tokens), len(expected[p])),
                        )
                        counts.mismatch_examples.append(
                            f"{time.perf_counter() - end:+.1f} s: prompt {p}, token {first} of "
                            f"{len(tokens)} differs; tokens with a branch lost: {lost}, e.g. "
                            f"(token, layer, branch, outcome) {lost_steps[:2]}"
                        )

        await asyncio.gather(*(client(c) for c in range(cfg.clients)))


def _processes(cluster: LocalCluster) -> dict[str, int]:
    assert cluster.gateway is not None
    return {"gateway": cluster.gateway.pid} | {
        f"node{i}": n.pid for i, n in enumerate(cluster.nodes)
    }


def _settle(cluster: LocalCluster, cfg: SoakConfig) -> tuple[list[int], float]:
    """Wait (up to ``settle_s``) until the gateway has ended every session and the nodes
    hold none; return the sessions each node still holds and the gateway's unended count."""
    deadline = time.monotonic() + cfg.settle_s
    while True:
        unended = cluster.gateway_metrics()[("mbt_unended_sessions", ())]
        held = [cluster.describe_node(i).open_sessions for i in range(len(cluster.nodes))]
        if (sum(held) == 0 and unended == 0) or time.monotonic() > deadline:
            return held, unended
        time.sleep(0.2)


def run_soak(cfg: SoakConfig) -> SoakResult:
    """Start a TLS cluster, churn it under load for ``duration_s``, settle, report."""
    ckpt = load_checkpoint(cfg.checkpoint)
    workload = Workload(prompts=PROMPTS, max_new_tokens=cfg.max_new_tokens, text_chars=16)
    expected = run_baseline(ckpt, workload).outputs
    gateway_args = (
        *("--hedge", "--request-timeout-s", f"{cfg.request_timeout_s:g}"),
        *("--log-level", "INFO"),  # membership events, for the log kept with the report
    )
    counts = Requests()
    with LocalCluster(checkpoint=cfg.checkpoint, layout=cfg.layout, gateway_args=gateway_args) as c:
        warm = Requests()  # one round first: start RSS is after the first allocations
        asyncio.run(_clients(c, replace(cfg, clients=len(PROMPTS)), expected, 0.0, warm, 1))
        start_pids = _processes(c)
        start_rss = {name: memory_mib(pid) for name, pid in start_pids.items()}
        t0 = time.perf_counter()
        churn = _Churn(c, cfg, t0)
        churn.start()
        total = round(cfg.duration_s)
        bar = tqdm(total=total, unit="s", disable=not cfg.progress, leave=False)

        async def main() -> None:
            async def tick() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    bar.n = min(total, round(time.perf_counter() - t0))
                    bar.set_postfix(ok=counts.completed, failed=counts.failed)

            ticker = asyncio.create_task(tick())
            try:
                await _clients(c, cfg, expected, t0 + cfg.duration_s, counts)
            finally:
                ticker.cancel()

        try:
            asyncio.run(main())
        finally:
            bar.close()
            churn.stop.set()
            churn.join()
        wall = time.perf_counter() - t0
        end_pids = _processes(c)
        rss = {
            name: {
                "start": start_rss[name],
                "end": memory_mib(pid),
                "restarted": pid != start_pids[name],
            }
            for name, pid in end_pids.items()
        }
        c.wait_until_complete()
        held, unended = _settle(c, cfg)
        log = c.gateway.all_output() if c.gateway is not None else ""
    config = asdict(cfg) | {"layout": asdict(cfg.layout), "checkpoint": str(cfg.checkpoint)}
    return SoakResult(
        config, wall, counts, churn.faults, rss, sum(held), unended, held, churn.error, log
    )


def summary(result: SoakResult) -> str:
    cfg, r = result.config, result.requests
    kinds = {a: sum(f.action == a for f in result.faults) for a in FAULTS}
    lines = [
        f"mbt-bench soak: {cfg['layout']['nodes']} nodes x {cfg['layout']['replicas']} "
        f"replicas, mutual TLS, {cfg['clients']} clients x {cfg['max_new_tokens']} tokens, "
        f"{result.wall_s:.0f} s, seed {cfg['seed']}",
        f"faults: {len(result.faults)} ({kinds['kill']} kill+restart, "
        f"{kinds['pause']} pause+resume), one at a time",
        f"requests: {r.sent} sent, {r.completed} completed, {r.failed} failed; "
        f"greedy mismatches: {r.mismatches}; completions with a branch step lost: {r.masked}; "
        f"{r.tokens / max(result.wall_s, 1e-9):.1f} tok/s",
        f"sessions left on nodes: {result.sessions_left} {result.sessions_left_by_node} "
        f"(gateway's unended at the end: {result.unended_at_end:g})",
        f"{'RSS MiB':<10}{'start':>9}{'end':>9}",
    ]
    for name, m in result.rss_mib.items():
        note = "  (restarted: a new process)" if m["restarted"] else ""
        lines.append(f"{name:<10}{m['start']:>9.1f}{m['end']:>9.1f}{note}")
    for message, n in result.requests.errors.items():
        lines.append(f"  {n} x {message}")
    lines += [f"  mismatch {m}" for m in result.requests.mismatch_examples]
    missed = result.missed()
    lines.append("targets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return "\n".join(lines)
