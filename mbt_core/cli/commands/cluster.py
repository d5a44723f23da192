"""Run a local cluster on this machine and generate through it: the distributed main job.

Exports the model (default: the shipped one) into a temporary folder signed with a throw-away
key, makes a throw-away cluster CA with a certificate per process (mutual TLS everywhere, as
every node and gateway runs by default; --insecure for plaintext), starts NODES branch-node
processes and an aggregator gateway on 127.0.0.1, generates from
PROMPT through the gateway, then prints what every layer's branches did: which node served each
branch, how often it answered or was masked, and its latency. Everything is torn down at the
end, also on Ctrl-C. --kill-node-after N kills one node after N tokens to show an outage.
The gateway also serves the OpenAI-compatible HTTP API and the live web view at its root (--http,
a free port by default; both URLs are printed, the web view's with the cluster's bearer token:
with TLS, clients of the gateway show a generated token, which a browser can, rather than a
client certificate); --keep-running keeps the cluster up after the generation, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections import defaultdict
from pathlib import Path

from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.model.sampling import SamplingConfig
from mbt_core.wire.gateway_client import describe_layers, generate_remote
from mbt_core.wire.swarm import OUTCOME_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="ROMEO:", help="text to continue")
    p.add_argument("--checkpoint", type=Path, default=None, help="model (default: the shipped one)")
    p.add_argument("--nodes", type=int, default=4, help="branch-node processes")
    p.add_argument("--replicas", type=int, default=1, help="nodes serving each branch")
    p.add_argument("--max-new-tokens", type=int, default=60, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--policy",
        choices=("all", "quorum", "deadline"),
        default="all",
        help="the gateway's fan-out policy",
    )
    p.add_argument("--deadline-ms", type=float, default=100.0, help="with --policy deadline")
    p.add_argument(
        "--kill-node-after",
        type=int,
        default=None,
        metavar="N",
        help="SIGKILL the first node after N tokens, to watch the outage",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext everywhere instead of mutual TLS with a throw-away cluster CA",
    )
    p.add_argument(
        "--http",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the gateway serves the OpenAI-compatible HTTP API (default: a free port on "
        "127.0.0.1)",
    )
    p.add_argument("--no-http", action="store_true", help="no HTTP API")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="after the generation, keep the cluster serving until Ctrl-C (or SIGTERM)",
    )
    p.add_argument(
        "--show-branches",
        action="store_true",
        help="also print, per token, which branches every layer used",
    )


def run(args: argparse.Namespace) -> int:
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        seed=args.seed,
    )
    gateway_args = ["--policy", args.policy, "--deadline-ms", str(args.deadline_ms)]
    if not args.no_http:
        gateway_args += ["--http-listen", args.http]
    print(f"starting {args.nodes} nodes and a gateway on 127.0.0.1 ...", file=sys.stderr)
    with LocalCluster(
        args.checkpoint,
        Layout(args.nodes, args.replicas),
        gateway_args=tuple(gateway_args),
        tls=not args.insecure,
        api_token=True,  # a browser can show a token, not the cluster's client certificate
    ) as cluster:
        names = {}
        for i, (node, served) in enumerate(zip(cluster.nodes, cluster.served, strict=True)):
            names[node.ready_line.split("node id ")[1].split(",")[0]] = f"node{i}"
            print(
                f"  node{i} pid {node.pid:<7} {node.address:<21} serves "
                + " ".join(f"{layer}:{b}" for layer, b in served),
                file=sys.stderr,
            )
        print(
            f"  gateway pid {cluster.gateway.pid} {cluster.address}, "  # type: ignore[union-attr]
            f"metrics {cluster.metrics_url}",
            file=sys.stderr,
        )
        if cluster.http_url:
            print(f"  OpenAI API {cluster.http_url}{_client_files(cluster)}", file=sys.stderr)
            print(f"  web view {web_view_url(cluster)}", file=sys.stderr)
        print(file=sys.stderr)
        stats: dict[tuple[int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        latencies = []
        sys.stdout.write(args.prompt)
        events = generate_remote(cluster.address, args.prompt, cfg, credentials=cluster.credentials)
        for event in events:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            latencies.append(event.latency_ms)
            for layer in event.layers:
                for b in layer.branches:
                    s = stats[(layer.layer, b.branch)]
                    s[OUTCOME_NAMES.get(b.outcome, "?")] += 1
                    if b.node_id:
                        s["ms"] += b.latency_ms
                        s[f"node:{names.get(b.node_id, b.node_id[:8])}"] = 1
            if args.show_branches:
                print(f"\n[token {event.index}] {describe_layers(event)}", file=sys.stderr)
            if args.kill_node_after is not None and event.index + 1 == args.kill_node_after:
                cluster.nodes[0].kill()
                print(f"\n[killed node0 after {event.index + 1} tokens]", file=sys.stderr)
        sys.stdout.write("\n\n")
        _report(stats, latencies)
        if args.keep_running:
            _serve_until_stopped(cluster)
    return 0


def _client_files(cluster: LocalCluster) -> str:
    """With TLS, the files a client needs (curl --cacert, and the token or a certificate)."""
    tls = cluster.credentials.tls
    if not tls.enabled:
        return ""
    if cluster.api_token_file is not None:
        return f" (bearer token in {cluster.api_token_file}, CA {tls.ca})"
    return f" (client certificate {tls.cert}, key {tls.key}, CA {tls.ca})"


def web_view_url(cluster: LocalCluster) -> str:
    """The web view, with the bearer token in the fragment (which the browser keeps to itself:
    the page reads it and sends it as a header). With TLS the certificate is the throw-away
    cluster CA's, which a browser does not know: it asks once whether to go on."""
    token = cluster.credentials.token
    return cluster.web_url + (f"#token={token}" if token else "")


def _serve_until_stopped(cluster: LocalCluster) -> None:
    """Block until Ctrl-C or SIGTERM; the caller's ``with`` then tears the cluster down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where started ignoring it
    print(
        f"\nserving: gRPC {cluster.address}"
        + (f", OpenAI API {cluster.http_url}" if cluster.http_url else "")
        + (f", web view {web_view_url(cluster)}" if cluster.web_url else "")
        + "; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


def _report(stats: dict[tuple[int, int], dict[str, float]], latencies: list[float]) -> None:
    print(
        f"{'layer':>5} {'branch':>6}  {'answered by':<14} {'used':>5} {'masked':>6} "
        f"{'rejected':>8} {'mean ms':>8}"
    )
    for (layer, branch), s in sorted(stats.items()):
        nodes = ",".join(k.split(":", 1)[1] for k in s if k.startswith("node:")) or "-"
        used = int(s["ok"])
        mean = s["ms"] / max(1, used + int(s["rejected"]))
        print(
            f"{layer:>5} {branch:>6}  {nodes:<14} {used:>5} {int(s['masked']):>6} "
            f"{int(s['rejected']):>8} {mean:>8.2f}"
        )
    if latencies:
        ordered = sorted(latencies)
        print(
            f"\n{len(ordered)} tokens, per-token latency p50 {ordered[len(ordered) // 2]:.1f} ms, "
            f"max {ordered[-1]:.1f} ms"
        )
