"""``mbt-scale-bench``: an imported-size model served by node processes, the figures at scale.

By default an untrained Llama-shaped decoder the size of a real 1B model (d_model 2048, 24
blocks, 32 heads over 4 key-value groups, 5632 MLP neurons, a 32k vocabulary, bfloat16),
split K=4 (48 MBT layers: attention and MLP per block), exported and served by 4 node
processes, node b holding branch b of every layer. One run reports:

* the time from starting the processes to a complete cluster, and to the first token;
* the per-token latency of greedy generation through the gateway and in-process (ratio);
* the bytes per layer step of decoding on the wire, sent and received (every node's);
* the peak RSS of each node and of the gateway, and the branch weights each node serves.

The weights are random (a benchmark of serving, not of quality): only the shapes matter.
The export is not calibrated (calibration would run the whole model over text first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbt_aggregator.bench import wire_counters
from mbt_core.artifacts.manifest import read_manifest
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.cluster.process import memory_mib
from mbt_core.model.checkpoint import load_checkpoint, save_checkpoint
from mbt_core.model.config import STORAGE_DTYPES, ModelConfig
from mbt_core.model.decoder import swiglu_decoder
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.wire.gateway_client import generate_remote

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


@dataclass(frozen=True)
class ScaleShape:
    """The decoder benchmarked; the defaults are a 1.2B-parameter Llama-style model."""

    d_model: int = 2048
    blocks: int = 24
    heads: int = 32
    kv_heads: int = 4
    intermediate: int = 5632
    vocab: int = 32000
    branches: int = 4
    dtype: str = "bfloat16"
    context: int = 512  # what each node reserves per session

    def config(self, eos: int) -> ModelConfig:
        spec = swiglu_decoder(
            self.vocab,
            self.d_model,
            self.heads,
            self.blocks,
            self.intermediate,
            self.context,
            kv_heads=self.kv_heads,
            parallel_residual=False,
            tied_embeddings=False,
            eos_token_id=eos,
        )
        return ModelConfig.sliced(spec, self.branches, self.context, self.dtype, eos)


def random_checkpoint(shape: ScaleShape, path: Path) -> int:
    """Write an untrained model of ``shape`` (the shipped tokenizer); returns its parameters.

    Built on the meta device and filled tensor by tensor in its dtype: a float32 model first
    would need twice the memory of the bfloat16 one.
    """
    tokenizer = load_checkpoint().tokenizer  # the shipped one: fewer tokens than rows is fine
    cfg = shape.config(tokenizer.eos_id)
    with torch.device("meta"):
        model = MBTLanguageModel(cfg)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha_logits"):
                p.zero_()  # alpha = 1/K, as an import gives
            elif p.dim() == 1:
                p.fill_(1.0)  # norm gains
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * 0.02)
    save_checkpoint(path, model, tokenizer, {"benchmark": "untrained scale model"})
    return model.num_parameters()


def run_scale(shape: ScaleShape, nodes: int, tokens: int, root: Path) -> dict[str, Any]:
    path = root / "scale.safetensors"
    t0 = time.perf_counter()
    parameters = random_checkpoint(shape, path)
    build_s = time.perf_counter() - t0
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    t0 = time.perf_counter()
    with LocalCluster(path, Layout(nodes, 1), tls=False, calibrate=False) as cluster:
        cluster.wait_until_complete(timeout_s=600)
        ready_s = time.perf_counter() - t0  # export, process start, verified loads, admission
        first, remote, produced = None, [], []
        before = wire_counters(cluster)
        start = time.perf_counter()
        for event in generate_remote(cluster.address, PROMPT, cfg):
            if first is None:  # decode steps from here on: the prompt's prefill is not counted
                first, before = time.perf_counter() - start, wire_counters(cluster)
            remote.append(event.latency_ms)
            produced.append(event.token_id)
        steps, sent, received = (a - b for a, b in zip(wire_counters(cluster), before, strict=True))
        assert cluster.gateway is not None
        node_rss = [memory_mib(n.pid, peak=True) for n in cluster.nodes]
        gateway_rss = memory_mib(cluster.gateway.pid, peak=True)
        manifest = read_manifest(cluster.served_artifacts)
        served_mib = [
            sum(manifest.branch(*key).size for key in keys) / 2**20 for keys in cluster.served
        ]
    ckpt = load_checkpoint(path)
    ids = ckpt.tokenizer.encode(PROMPT)
    local, in_process_tokens, t0 = [], [], time.perf_counter()
    for token, _ in generate(ckpt.model, ids, cfg):
        local.append((time.perf_counter() - t0) * 1e3)
        in_process_tokens.append(token)
        t0 = time.perf_counter()
    distributed, in_process = statistics.median(remote[1:]), statistics.median(local[1:])
    p90 = {name: _p90(ms[1:]) for name, ms in (("distributed", remote), ("in_process", local))}
    return {
        "shape": shape.__dict__,
        "parameters": parameters,
        "nodes": nodes,
        "tokens": tokens,
        "build_s": build_s,
        "start_to_complete_s": ready_s,
        "first_token_s": first,
        "start_to_first_token_s": ready_s + (first or 0.0),
        "token_ms_distributed": distributed,
        "token_ms_in_process": in_process,
        "token_ms_p90_distributed": p90["distributed"],
        "token_ms_p90_in_process": p90["in_process"],
        "token_latency_ratio": distributed / in_process,
        "greedy_equal": produced == in_process_tokens,
        "prefill_ms_distributed": remote[0],
        "prefill_ms_in_process": local[0],
        "sent_bytes_per_layer_step": sent / steps,
        "received_bytes_per_layer_step": received / steps,
        "node_peak_rss_mib": node_rss,
        "gateway_peak_rss_mib": gateway_rss,
        "node_branch_mib": served_mib,
        "branch_mib_total": sum(served_mib),
    }


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def report(r: dict[str, Any]) -> str:
    s = r["shape"]
    lines = [
        f"model: d_model {s['d_model']}, {s['blocks']} blocks ({2 * s['blocks']} MBT layers), "
        f"K={s['branches']}, vocab {s['vocab']}, {s['dtype']}, "
        f"{r['parameters'] / 1e9:.2f}B parameters; {r['nodes']} node processes",
        f"start to complete cluster  {r['start_to_complete_s']:8.1f} s   "
        f"(+ first token {r['first_token_s']:.2f} s = {r['start_to_first_token_s']:.1f} s)",
        f"per token, distributed     {r['token_ms_distributed']:8.1f} ms median, "
        f"{r['token_ms_p90_distributed']:.1f} ms p90",
        f"per token, in-process      {r['token_ms_in_process']:8.1f} ms median, "
        f"{r['token_ms_p90_in_process']:.1f} ms p90",
        f"distributed / in-process   {r['token_latency_ratio']:8.2f}x   "
        f"(greedy tokens equal: {r['greedy_equal']})",
        f"prefill of the prompt      {r['prefill_ms_distributed']:8.1f} ms distributed, "
        f"{r['prefill_ms_in_process']:.1f} ms in-process",
        f"bytes per decode step      {r['sent_bytes_per_layer_step']:8.0f} sent, "
        f"{r['received_bytes_per_layer_step']:.0f} received per layer (all its nodes)",
        f"gateway peak RSS           {r['gateway_peak_rss_mib']:8.0f} MiB",
    ]
    for i, (rss, mib) in enumerate(zip(r["node_peak_rss_mib"], r["node_branch_mib"], strict=True)):
        share = mib / r["branch_mib_total"]
        lines.append(
            f"node {i} peak RSS            {rss:8.0f} MiB   "
            f"(serves {mib:.0f} MiB of branch weights, {share:.0%} of them)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mbt-scale-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = ScaleShape()
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--blocks", type=int, default=d.blocks, help="transformer blocks")
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate, help="MLP neurons")
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--branches", type=int, default=d.branches, help="K per layer")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default=d.dtype)
    p.add_argument("--context", type=int, default=d.context, help="positions per session")
    p.add_argument("--nodes", type=int, default=4, help="node processes")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.nodes < 1:
        p.error("--tokens must be at least 2 and --nodes at least 1")
    try:
        shape = ScaleShape(
            args.d_model,
            args.blocks,
            args.heads,
            args.kv_heads,
            args.intermediate,
            args.vocab,
            args.branches,
            args.dtype,
            args.context,
        )
        shape.config(0)  # refuse a shape that cannot be split before building anything
    except ValueError as exc:
        print(f"mbt-scale-bench: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mbt-scale-") as tmp:
        result = run_scale(shape, args.nodes, args.tokens, Path(tmp))
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
