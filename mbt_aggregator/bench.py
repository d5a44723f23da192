"""``mbt-aggregator-bench``: what the gateway adds, and how throughput grows with concurrency.

From one run on this machine (ratios, since the machines are shared and noisy):

* one layer's fan-out + aggregation through the gateway's engine, against a bare gRPC echo
  fan-out of the same payload to as many echo processes, plus one branch's compute; for one
  session's one-token step, or (``--rows``) the continuous batch of several sessions' steps;
* per-token latency of distributed greedy generation against in-process generation;
* tokens/s of N concurrent generations against one generation;
* with ``--wire-dtypes``, for each wire dtype (the gateway restarted with ``--wire-dtype``):
  bytes per layer step, sent and received, over one greedy generation, and the KL divergence
  of the scored next-token distributions from the in-process float32 model.

It runs a :class:`LocalCluster` of the shipped model (or ``--checkpoint``, or an untrained model
``--d-model`` wide, for other payload sizes) and cleans it up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from mbt_aggregator.client import NodeClient
from mbt_aggregator.config import WIRE_DTYPES
from mbt_aggregator.defense import Defense, DefenseConfig
from mbt_aggregator.engine import Engine
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.outage.baseline import window_logprobs
from mbt_aggregator.outage.report import kl_divergence
from mbt_aggregator.outage.workload import perplexity_text
from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.registry import Node, Registry
from mbt_aggregator.session import Session
from mbt_core.artifacts.manifest import read_manifest
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.cluster.timing import branch_step, interleaved
from mbt_core.model.checkpoint import load_checkpoint, save_checkpoint
from mbt_core.model.config import AggregationConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.gateway_client import GatewayClient, generate_remote
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

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


async def _fanout(cluster: LocalCluster, iters: int, rows: int = 1) -> dict[str, float]:
    """The three timings interleave in short rounds, so that the machine's drift (it is shared)
    weighs on each alike. A layer step carries one-token steps of ``rows`` sessions (the
    continuous batch of that many generations); the echo carries a payload of as many rows."""
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
    sessions = [Session() for _ in range(rows)]
    # Layer inputs as generation makes them: embeddings of tokens (random ones) at their
    # positions, so that outputs stay within the manifest's calibrated bounds.
    torch.manual_seed(0)
    with torch.no_grad():
        inputs = [
            model.embed(torch.randint(0, model.cfg.vocab_size, (1, PREFIX + 1)), 0)[0]
            for _ in sessions
        ]
        for session, h in zip(sessions, inputs, strict=True):
            await engine.run_layer(session, 0, 0, h[:PREFIX])
    xs = [h[PREFIX:] for h in inputs]
    payload = pb.ForwardRequest(
        layer=0,
        branches=[0],
        inputs=encode(torch.cat(xs)),
        steps=[
            pb.SessionStep(session_id=f"{i:032d}", start=PREFIX, length=1, secret=b"e" * 16)
            for i in range(rows)
        ],
    ).SerializeToString()

    async def layer_step() -> None:
        # Each rolls back to PREFIX; the layer's worker gathers them into one fan-out.
        await asyncio.gather(
            *(engine.run_layer(s, 0, PREFIX, x) for s, x in zip(sessions, xs, strict=True))
        )

    echoes = [_start_echo() for _ in cluster.nodes]
    channels = [grpc.aio.insecure_channel(addr) for _, addr in echoes]
    try:
        calls = [c.unary_unary(ECHO_METHOD) for c in channels]

        async def echo() -> None:
            await asyncio.gather(*(call(payload, timeout=10) for call in calls))

        compute = branch_step(model.layers[0].branches[0], PREFIX, rows)
        timed = {"layer": layer_step, "echo": echo, "compute": compute}
        times = await interleaved(timed, iters)
    finally:
        for c in channels:
            await c.close()
        for echo_proc, _ in echoes:
            echo_proc.kill()
            echo_proc.wait()
        for session in sessions:
            await engine.end_session(session)
        await engine.close()
        for node in registry.nodes:
            await node.client.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "rows": rows,
        "d_model": d,
        "layer_step_ms": med["layer"] * 1e3,
        "echo_fanout_ms": med["echo"] * 1e3,
        "branch_compute_ms": med["compute"] * 1e3,
        "fanout_ratio": med["layer"] / (med["echo"] + med["compute"]),
    }


def _tokens_per_s(address: str, n: int, tokens: int) -> float:
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eos=False)

    async def one(i: int) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw

            stub = gw_grpc.GatewayServiceStub(channel)
            req = gw.GenerateRequest(prompt=f"ROMEO {i}:", max_new_tokens=cfg.max_new_tokens)
            return len([e async for e in stub.Generate(req, timeout=600)])

    async def run() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(n))))

    t0 = time.perf_counter()
    produced = asyncio.run(run())
    return produced / (time.perf_counter() - t0)


async def _fanouts(
    cluster: LocalCluster, iters: int, rows: Sequence[int]
) -> list[dict[str, float]]:
    return [await _fanout(cluster, iters, n) for n in rows]  # one event loop for grpc.aio


def _widened(d_model: int, root: Path) -> Path:
    """An untrained model of the shipped layout, ``d_model`` wide: for payload sizes other than
    the shipped model's (timings only, its text is noise)."""
    shipped = load_checkpoint(None)
    cfg = shipped.model.cfg.widened(d_model)
    torch.manual_seed(0)
    model = MBTLanguageModel(cfg).eval()
    path = root / f"untrained-d{d_model}.safetensors"
    save_checkpoint(path, model, shipped.tokenizer, {"note": "untrained, for benchmarks"})
    return path


WIRE_TEXT_CHARS = 1200  # the outage bench's excerpt of The Tempest: ~3 context windows


def wire_counters(cluster: LocalCluster) -> tuple[float, float, float]:
    """Layer steps, bytes sent and bytes received so far, from the gateway's metrics."""
    m = cluster.gateway_metrics()
    steps = sum(v for (name, _), v in m.items() if name == "mbt_layer_step_seconds_count")
    sent = m[("mbt_wire_bytes_total", (("direction", "sent"),))]
    return steps, sent, m[("mbt_wire_bytes_total", (("direction", "received"),))]


def _wire(
    cluster: LocalCluster, gateway_args: Sequence[str], dtype: str, tokens: int
) -> dict[str, Any]:
    """One wire dtype: bytes per layer step over one greedy generation (deltas of the gateway's
    counters), and the KL of the scored text from the in-process float32 model."""
    cluster.restart_gateway([*gateway_args, "--wire-dtype", dtype])
    cluster.wait_until_complete()
    before = wire_counters(cluster)
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    produced = [e.token_id for e in generate_remote(cluster.address, "ROMEO:", cfg)]
    steps, sent, received = (a - b for a, b in zip(wire_counters(cluster), before, strict=True))
    ckpt = load_checkpoint(cluster.checkpoint)
    text = perplexity_text(WIRE_TEXT_CHARS)
    reference = window_logprobs(ckpt.model, ckpt.tokenizer.encode(text)).numpy()
    reply = GatewayClient(cluster.address).score(text, return_logprobs=True)
    in_process = [t for t, _ in generate(ckpt.model, ckpt.tokenizer.encode("ROMEO:"), cfg)]
    return {
        "dtype": dtype,
        "sent_bytes_per_layer_step": sent / steps,
        "received_bytes_per_layer_step": received / steps,
        "kl_vs_float32": kl_divergence(reference, decode(reply.logprobs).numpy()),
        "greedy_equal": produced == in_process,
    }


def run_bench(
    checkpoint: Path | None = None,
    iters: int = 200,
    tokens: int = 32,
    concurrency: int = 32,
    rows: Sequence[int] = (1,),
    d_model: int | None = None,
    wire_dtypes: Sequence[str] = (),
) -> dict[str, Any]:
    """The figures of one run; the fan-out figures at the top level are those of ``rows[0]``,
    and ``fanouts`` holds one entry per row count."""
    if not rows or min(rows) <= 0:
        raise ValueError("rows must be positive")
    torch.set_num_threads(1)
    # One client runs every generation here: lift the per-client limit to the concurrency.
    per_client = ("--max-requests-per-client", str(max(concurrency, 16)))
    with tempfile.TemporaryDirectory(prefix="mbt-bench-") as tmp:
        if d_model is not None:
            checkpoint = _widened(d_model, Path(tmp))
        # Plaintext, as its echo baseline: the ratios compare like with like.
        with LocalCluster(checkpoint, Layout(4, 1), gateway_args=per_client, tls=False) as cluster:
            fanouts = asyncio.run(_fanouts(cluster, iters, rows))
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
            wire = [_wire(cluster, per_client, d, tokens) for d in wire_dtypes]
    single, many = statistics.median(runs[1]), statistics.median(runs[concurrency])
    result: dict[str, Any] = dict(fanouts[0])
    result.update(
        {
            "fanouts": fanouts,
            "token_ms_distributed": statistics.median(remote[1:]),
            "token_ms_in_process": statistics.median(local[1:]),
            "tokens_per_s_1": single,
            f"tokens_per_s_{concurrency}": many,
            "concurrency": concurrency,
            "throughput_ratio": many / single,
            "wire": wire,
        }
    )
    result["token_latency_ratio"] = result["token_ms_distributed"] / result["token_ms_in_process"]
    return result


def _rows(text: str) -> tuple[int, ...]:
    try:
        rows = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,16, got {text!r}") from None
    if not rows or min(rows) <= 0:
        raise argparse.ArgumentTypeError("row counts must be positive")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mbt-aggregator-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model (default: shipped)")
    p.add_argument(
        "--d-model",
        type=int,
        default=None,
        help="time an untrained model of the shipped layout this wide instead (payload sizes)",
    )
    p.add_argument(
        "--rows",
        type=_rows,
        default=(1,),
        help="sessions per timed layer step, comma-separated (default 1; e.g. 1,16)",
    )
    p.add_argument(
        "--iters", type=int, default=200, help="timed layer steps, echoes and computes (medians)"
    )
    p.add_argument("--tokens", type=int, default=32, help="tokens per generation")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent generations")
    p.add_argument(
        "--wire-dtypes",
        type=_wire_dtypes,
        default=(),
        metavar="D[,D...]",
        help=f"also measure these wire dtypes ({', '.join(WIRE_DTYPES[1:])}): bytes per layer "
        "step and KL against float32",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.d_model is not None and args.checkpoint is not None:
        p.error("give --checkpoint or --d-model, not both")
    try:
        r = run_bench(
            args.checkpoint,
            args.iters,
            args.tokens,
            args.concurrency,
            args.rows,
            args.d_model,
            args.wire_dtypes,
        )
    except ValueError as exc:
        p.error(str(exc))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    n = int(r["concurrency"])
    model = "shipped model" if args.d_model is None else f"untrained d_model {args.d_model}"
    if args.checkpoint is not None:
        model = str(args.checkpoint)
    print(f"mbt-aggregator-bench: {model}, 4 node processes, loopback, one run\n")
    for f in r["fanouts"]:
        shape = f"[{f['rows']}, {f['d_model']}]"
        print(f"  layer fan-out + aggregation {shape:>10} {f['layer_step_ms']:8.3f} ms")
        print(f"  echo fan-out to 4 processes {shape:>10} {f['echo_fanout_ms']:8.3f} ms")
        print(f"  one branch's compute        {shape:>10} {f['branch_compute_ms']:8.3f} ms")
    print(f"  token, distributed greedy        {r['token_ms_distributed']:8.3f} ms")
    print(f"  token, in process                {r['token_ms_in_process']:8.3f} ms")
    print(f"  tokens/s, 1 generation           {r['tokens_per_s_1']:8.1f}")
    print(f"  tokens/s, {n} generations        {r[f'tokens_per_s_{n}']:8.1f}\n")
    for f in r["fanouts"]:
        target = "  (target <= 1.5)" if f["rows"] == 1 else ""
        print(
            f"  fan-out ratio     layer step / (echo fan-out + compute) = {f['fanout_ratio']:.2f}"
            f"  [{f['rows']}, {f['d_model']}]{target}"
        )
    print(
        f"  latency ratio     distributed / in-process token        = "
        f"{r['token_latency_ratio']:.2f}"
    )
    target = "  (target >= 12)" if n == 32 else ""
    print(
        f"  throughput ratio  {n} generations / 1                   = "
        f"{r['throughput_ratio']:.2f}{target}"
    )
    if r["wire"]:
        print("\n  wire dtype   bytes/layer step sent   received   KL vs float32   greedy equal")
        base = r["wire"][0]["sent_bytes_per_layer_step"]
        for w in r["wire"]:
            print(
                f"  {w['dtype']:<12} {w['sent_bytes_per_layer_step']:>12.0f} "
                f"({w['sent_bytes_per_layer_step'] / base:4.2f}x) "
                f"{w['received_bytes_per_layer_step']:>10.0f}   {w['kl_vs_float32']:>13.3g}   "
                f"{'yes' if w['greedy_equal'] else 'no'}"
            )
    return 0


def _wire_dtypes(text: str) -> tuple[str, ...]:
    found = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in found if d not in WIRE_DTYPES[1:]]
    if bad or not found:
        raise argparse.ArgumentTypeError(
            f"expected dtypes from {', '.join(WIRE_DTYPES[1:])}, got {text!r}"
        )
    return found


if __name__ == "__main__":
    sys.exit(main())
