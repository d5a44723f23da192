"""``mbt-node-bench``: what a node adds on top of the network and the compute it must do.

All figures come from one run on this machine, so they are compared as ratios:

* one-token ``Forward`` (d_model 256 by default) against a bare gRPC echo of the same payload
  to another process plus the same branch compute in this process;
* one ``Forward`` carrying N sessions' one-token steps against a one-session ``Forward``.

It exports a random model into a temporary folder, signs it with a throw-away key, starts a
real ``mbt-node`` process and an echo server process on 127.0.0.1, and cleans both up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.timing import Timed, branch_step, interleaved
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import generate_key, load_private_key
from mbt_core.wire.codec import encode
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_node.launcher import start_node

ECHO_METHOD = "/mbt.bench.Echo/Echo"
PREFIX = 64  # positions cached before the timed steps; each timed step rolls back to here
SECRET = b"bench-session-secret"  # binds the bench's sessions to it (protocol v2)


async def _serve_echo() -> None:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "mbt.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo ready: listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def _start_echo() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbt_node.bench", "--echo-server"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "echo ready" not in line:
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def _export_model(root: Path, d_model: int, context: int) -> tuple[Path, Path, MBTLanguageModel]:
    tokenizer = Tokenizer.train(["a small text for a throw-away tokenizer " * 20], vocab_size=300)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=d_model,
        n_heads=max(1, d_model // 64),
        context_length=context,
        n_layers=1,
        branches=(1,),
    )
    torch.manual_seed(0)
    model = MBTLanguageModel(cfg).eval()
    key = generate_key(root / "keys", "bench")
    manifest = export_artifacts(Checkpoint(model, tokenizer), root / "artifacts")
    sign_manifest(root / "artifacts", manifest, load_private_key(key.private_path))
    return root / "artifacts", key.public_path, model


def _request(sessions: int, x: torch.Tensor, start: int) -> pb.ForwardRequest:
    steps = [
        pb.SessionStep(
            session_id=f"s{i}", start=start, length=x.shape[0] // sessions, secret=SECRET
        )
        for i in range(sessions)
    ]
    return pb.ForwardRequest(layer=0, branches=[0], steps=steps, inputs=encode(x))


async def _measure(
    address: str, echo_address: str, model: MBTLanguageModel, iters: int, sessions: int
) -> dict[str, list[float]]:
    d = model.cfg.d_model
    async with (
        grpc.aio.insecure_channel(address) as node,
        grpc.aio.insecure_channel(echo_address) as echo_channel,
    ):
        stub = pb_grpc.BranchServiceStub(node)
        echo = echo_channel.unary_unary(ECHO_METHOD)
        prefill = _request(sessions, torch.randn(sessions * PREFIX, d), 0)
        await stub.Forward(prefill, timeout=60)
        one = _request(1, torch.randn(1, d), PREFIX)
        many = _request(sessions, torch.randn(sessions, d), PREFIX)
        payload = one.SerializeToString()
        calls: dict[str, Timed] = {
            "forward_1": lambda: stub.Forward(one, timeout=10),
            "echo_1": lambda: echo(payload, timeout=10),
            "compute_1": branch_step(model.layers[0].branches[0], PREFIX),
            "forward_n": lambda: stub.Forward(many, timeout=10),
        }
        return await interleaved(calls, iters)


def run_bench(
    d_model: int = 256, iters: int = 300, sessions: int = 32, node_args: Sequence[str] = ()
) -> dict[str, float]:
    torch.set_num_threads(1)  # what the node uses by default
    with tempfile.TemporaryDirectory(prefix="mbt-node-bench-") as tmp:
        artifacts, public, model = _export_model(Path(tmp), d_model, context=PREFIX + 8)
        echo_proc, echo_address = _start_echo()
        node = start_node(
            [
                "--artifacts",
                str(artifacts),
                "--trusted-key",
                str(public),
                "--serve",
                "0:0",
                "--no-advertise",
                "--state-file",
                str(Path(tmp) / "state.json"),
                "--insecure",  # plaintext, as the echo baseline
                *node_args,
            ]
        )
        try:
            times = asyncio.run(_measure(node.address, echo_address, model, iters, sessions))
        finally:
            node.kill()
            echo_proc.kill()
            echo_proc.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "d_model": d_model,
        "sessions": sessions,
        "iters": iters,
        "forward_1_ms": med["forward_1"] * 1e3,
        "echo_1_ms": med["echo_1"] * 1e3,
        "compute_1_ms": med["compute_1"] * 1e3,
        "forward_n_ms": med["forward_n"] * 1e3,
        "overhead_ratio": med["forward_1"] / (med["echo_1"] + med["compute_1"]),
        "batch_ratio": med["forward_n"] / med["forward_1"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mbt-node-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--iters", type=int, default=300, help="timed calls per figure (medians)")
    p.add_argument("--sessions", type=int, default=32, help="sessions in the batched Forward")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--node-args", default="", help="extra mbt-node flags, e.g. '--dtype bfloat16'")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server:
        asyncio.run(_serve_echo())
        return 0
    r = run_bench(args.d_model, args.iters, args.sessions, shlex.split(args.node_args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    n = r["sessions"]
    print(f"mbt-node-bench: d_model {r['d_model']}, medians of {r['iters']} calls, one run\n")
    print(f"  Forward, 1 session x 1 token        {r['forward_1_ms']:8.3f} ms")
    print(f"  gRPC echo of the same payload       {r['echo_1_ms']:8.3f} ms")
    print(f"  branch compute in process           {r['compute_1_ms']:8.3f} ms")
    print(f"  Forward, {n} sessions x 1 token     {r['forward_n_ms']:8.3f} ms\n")
    print(
        f"  overhead ratio  Forward / (echo + compute) = {r['overhead_ratio']:.2f}  (target <= 1.3)"
    )
    print(
        f"  batch ratio     Forward({n}) / Forward(1)     = {r['batch_ratio']:.2f}  (target <= 4)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
