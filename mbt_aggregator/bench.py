"""``mbt-aggregator-bench``: what the gateway adds, and how throughput grows with concurrency.

From one run on this machine (ratios, since the machines are shared and noisy):

* one layer's fan-out + aggregation through the gateway's engine, against a bare gRPC echo
  fan-out of the same payload to as many echo processes, plus one branch's compute;
* per-token latency of distributed greedy generation against in-process generation;
* tokens/s of N concurrent generations against one generation.

It runs a :class:`LocalCluster` of the shipped model (or ``--checkpoint``) and cleans it up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.client import NodeClient
from mbt_aggregator.defense import Defense, DefenseConfig
from mbt_aggregator.engine import Engine, Session
from mbt_aggregator.local_cluster import Layout, LocalCluster
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, Registry
from mbt_aggregator.remote import generate_remote
from mbt_core.checkpoint import load_checkpoint
from mbt_core.codec import encode
from mbt_core.config import AggregationConfig
from mbt_core.manifest import read_manifest
from mbt_core.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.sampling import SamplingConfig, generate
from mbt_core.timing import branch_step, interleaved

ECHO_METHOD = "/mbt.bench.Echo/Echo"
PREFIX = 32  # positions cached before the timed layer steps
_THROUGHPUT_RUNS = 3  # alternating runs of 1 and of N generations


def _start_echo() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbt_node.bench", "--echo-server"], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "echo ready" not in line:
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


async def _fanout(cluster: LocalCluster, iters: int) -> dict[str, float]:
    """The three timings interleave in short rounds, so that the machine's drift (it is shared)
    weighs on each alike."""
    ckpt = load_checkpoint(cluster.checkpoint)
    model = ckpt.model
    registry = Registry()
    for i, (proc, served) in enumerate(zip(cluster.nodes, cluster.served, strict=True)):
        registry.add(Node(f"n{i}", proc.address, NodeClient(proc.address), frozenset(served)))
    # Checked as a gateway checks by default: the manifest's bounds, replica audits.
    defense = Defense(DefenseConfig(), read_manifest(cluster.served_artifacts).norm_bounds())
    metrics = Metrics(CollectorRegistry())
    engine = Engine(model, registry, FanoutPolicy(), AggregationConfig(), metrics, None, defense)
    d = model.cfg.d_model
    session = Session()
    with torch.no_grad():
        await engine.run_layer(session, 0, 0, torch.randn(PREFIX, d))
    x = torch.randn(1, d)
    payload = pb.ForwardRequest(
        layer=0,
        branches=[0],
        inputs=encode(x),
        steps=[pb.SessionStep(session_id="s" * 32, start=PREFIX, length=1)],
    ).SerializeToString()

    async def layer_step() -> None:
        await engine.run_layer(session, 0, PREFIX, x)  # rolls back to PREFIX each time

    echoes = [_start_echo() for _ in cluster.nodes]
    channels = [grpc.aio.insecure_channel(addr) for _, addr in echoes]
    try:
        calls = [c.unary_unary(ECHO_METHOD) for c in channels]

        async def echo() -> None:
            await asyncio.gather(*(call(payload, timeout=10) for call in calls))

        compute = branch_step(model.layers[0].branches[0], PREFIX)
        timed = {"layer": layer_step, "echo": echo, "compute": compute}
        times = await interleaved(timed, iters)
    finally:
        for c in channels:
            await c.close()
        for proc, _ in echoes:
            proc.kill()
            proc.wait()
        await engine.end_session(session)
        for node in registry.nodes:
            await node.client.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "layer_step_ms": med["layer"] * 1e3,
        "echo_fanout_ms": med["echo"] * 1e3,
        "branch_compute_ms": med["compute"] * 1e3,
        "fanout_ratio": med["layer"] / (med["echo"] + med["compute"]),
    }


def _tokens_per_s(address: str, n: int, tokens: int) -> float:
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eos=False)

    async def one(i: int) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            from mbt_core.protocol.mbt.v1 import gateway_pb2 as gw

            stub = gw_grpc.GatewayServiceStub(channel)
            req = gw.GenerateRequest(prompt=f"ROMEO {i}:", max_new_tokens=cfg.max_new_tokens)
            return len([e async for e in stub.Generate(req, timeout=600)])

    async def run() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(n))))

    t0 = time.perf_counter()
    produced = asyncio.run(run())
    return produced / (time.perf_counter() - t0)


def run_bench(
    checkpoint: Path | None = None, iters: int = 200, tokens: int = 32, concurrency: int = 32
) -> dict[str, float]:
    torch.set_num_threads(1)
    # One client runs every generation here: lift the per-client limit to the concurrency.
    per_client = ("--max-requests-per-client", str(max(concurrency, 16)))
    with LocalCluster(checkpoint, Layout(4, 1), gateway_args=per_client) as cluster:
        result = asyncio.run(_fanout(cluster, iters))
        cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
        remote = [e.latency_ms for e in generate_remote(cluster.address, "ROMEO:", cfg)]
        ckpt = load_checkpoint(checkpoint)
        ids = ckpt.tokenizer.encode("ROMEO:")
        local, t0 = [], time.perf_counter()
        for _ in generate(ckpt.model, ids, cfg):
            local.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
        # Alternating runs, medians of each: the machine's drift weighs on both alike.
        runs: dict[int, list[float]] = {1: [], concurrency: []}
        for _ in range(_THROUGHPUT_RUNS):
            for n in runs:
                runs[n].append(_tokens_per_s(cluster.address, n, tokens))
        single, many = statistics.median(runs[1]), statistics.median(runs[concurrency])
    result.update(
        {
            "token_ms_distributed": statistics.median(remote[1:]),
            "token_ms_in_process": statistics.median(local[1:]),
            "tokens_per_s_1": single,
            f"tokens_per_s_{concurrency}": many,
            "concurrency": concurrency,
            "throughput_ratio": many / single,
        }
    )
    result["token_latency_ratio"] = result["token_ms_distributed"] / result["token_ms_in_process"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mbt-aggregator-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model (default: shipped)")
    p.add_argument(
        "--iters", type=int, default=200, help="timed layer steps, echoes and computes (medians)"
    )
    p.add_argument("--tokens", type=int, default=32, help="tokens per generation")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent generations")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run_bench(args.checkpoint, args.iters, args.tokens, args.concurrency)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    n = int(r["concurrency"])
    print("mbt-aggregator-bench: shipped model, 4 node processes, loopback, one run\n")
    print(f"  layer fan-out + aggregation      {r['layer_step_ms']:8.3f} ms")
    print(f"  echo fan-out to 4 processes      {r['echo_fanout_ms']:8.3f} ms")
    print(f"  one branch's compute             {r['branch_compute_ms']:8.3f} ms")
    print(f"  token, distributed greedy        {r['token_ms_distributed']:8.3f} ms")
    print(f"  token, in process                {r['token_ms_in_process']:8.3f} ms")
    print(f"  tokens/s, 1 generation           {r['tokens_per_s_1']:8.1f}")
    print(f"  tokens/s, {n} generations        {r[f'tokens_per_s_{n}']:8.1f}\n")
    print(
        f"  fan-out ratio     layer step / (echo fan-out + compute) = {r['fanout_ratio']:.2f}"
        "  (target <= 1.5)"
    )
    print(
        f"  latency ratio     distributed / in-process token        = "
        f"{r['token_latency_ratio']:.2f}"
    )
    print(
        f"  throughput ratio  {n} generations / 1                   = "
        f"{r['throughput_ratio']:.2f}  (target >= 12)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
