"""``mbt-aggregator``: the gateway that turns branch nodes into one model serving clients."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mbt_aggregator.auth import API_AUTH_MODES, ApiAuth
from mbt_aggregator.config import WIRE_DTYPES, AggregatorConfig, GatewayLimits
from mbt_aggregator.defense_cli import add_defense_arguments, defense_from_args
from mbt_aggregator.engine import GatherConfig
from mbt_aggregator.expansion import ACTIONS, ExpansionConfig
from mbt_aggregator.policy import MODES, FanoutPolicy
from mbt_aggregator.server import run_gateway
from mbt_core.cli.flags import (
    add_artifact_arguments,
    add_log_arguments,
    add_rpc_limit_argument,
    add_tls_arguments,
    tls_config_from_args,
    trust_config_from_args,
)
from mbt_core.cli.service import run_service
from mbt_core.model.config import AggregationConfig

EPILOG = """\
examples:
  mbt-aggregator --artifacts model/ --trusted-key owner.public.pem \\
      --tls-cert certs/gateway.crt --tls-key certs/gateway.key --tls-ca ca/ca.crt
  mbt-aggregator --artifacts model/ --trusted-key owner.public.pem --insecure --no-mdns \\
      --peers 10.0.0.5:7001,10.0.0.6:7001 --policy deadline --deadline-ms 200

Nodes are found over mDNS (_mbt._tcp.local.) and from --peers, and admitted only when Describe
shows the manifest's model, version, digest and artifact hashes. Clients: mbt generate
--gateway HOST:PORT, mbt eval --gateway HOST:PORT; metrics on /metrics of --metrics-port.

With --tls-cert/--tls-key/--tls-ca (mbt certs issue --role aggregator) nodes are reached over
mutual TLS and admitted only under the node id their certificate proves (an mDNS record that
claims another id is rejected), --roster limits the ids to a signed list, and the API is TLS
with --api-auth cert (default: a cluster client certificate), token or none. Without them the
gateway starts only with --insecure (plaintext, and it says what that gives up).

Batches are cut to fit every node's limits (steps, positions, message bytes per call, from
Describe), and the gateway keeps no more sessions open than the nodes' per-caller quotas allow:
a generation beyond them waits for a slot instead of failing.
"""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    pol, lim, bat = FanoutPolicy(), GatewayLimits(), GatherConfig()
    p = argparse.ArgumentParser(
        prog="mbt-aggregator",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_artifact_arguments(p)
    add_tls_arguments(p)
    p.add_argument("--listen", default="127.0.0.1:7070", help="gateway gRPC address")
    p.add_argument(
        "--http-listen",
        default=None,
        metavar="HOST:PORT",
        help="also serve the OpenAI-compatible HTTP API here (/v1/completions, "
        "/v1/chat/completions, /v1/models), with the same auth and TLS as the gRPC API "
        "(default: off)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9109,
        help="Prometheus /metrics port (0: a free port, -1: off)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument(
        "--peers",
        type=_csv,
        default=(),
        metavar="HOST:PORT,...",
        help="static node addresses (where multicast does not reach, Kubernetes)",
    )
    p.add_argument(
        "--mdns",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="discover nodes over mDNS",
    )
    p.add_argument("--interface", default="127.0.0.1", help="IPv4 address to browse mDNS on")
    p.add_argument(
        "--allow-node",
        action="append",
        default=None,
        metavar="NODE_ID",
        help="admit only these node ids (repeat)",
    )
    p.add_argument(
        "--roster",
        type=Path,
        default=None,
        metavar="ROSTER.json",
        help="signed roster (mbt roster sign): admit only its node ids; verified with the "
        "manifest's --trusted-key/--root",
    )
    p.add_argument(
        "--api-auth",
        choices=API_AUTH_MODES,
        default=None,
        help="who may call the gateway: cert (a client certificate of the cluster CA; the "
        "default with TLS), token (--api-token-file) or none (the default without TLS)",
    )
    p.add_argument(
        "--api-token-file",
        type=Path,
        default=None,
        help="file holding the bearer token clients must send (--api-auth token)",
    )
    p.add_argument(
        "--policy",
        choices=MODES,
        default=pol.mode,
        help="all: wait for every branch; quorum: k branches or a weight fraction; "
        "deadline: what answered in time",
    )
    p.add_argument("--quorum-branches", type=int, default=None)
    p.add_argument("--quorum-weight", type=float, default=None)
    p.add_argument("--grace-ms", type=float, default=pol.grace_ms)
    p.add_argument("--deadline-ms", type=float, default=pol.deadline_ms)
    p.add_argument("--request-timeout-s", type=float, default=pol.request_timeout_s)
    p.add_argument(
        "--min-branches",
        type=int,
        default=pol.min_branches,
        help="fewer usable branches in a layer fail the request (UNAVAILABLE)",
    )
    p.add_argument(
        "--hedge",
        action="store_true",
        help="send a slow branch to its second replica too, take the first answer",
    )
    p.add_argument(
        "--aggregation",
        choices=("mean", "trimmed", "median"),
        default="mean",
        help="mean: the model's weighted sum (exactly the in-process model); trimmed, median: "
        "coordinate-wise across branches. Branches compute different functions, so these "
        "change the output even when every branch is healthy: a blunt last resort, not a "
        "defense of the weighted sum (see the defenses below)",
    )
    p.add_argument(
        "--norm-factor",
        type=float,
        default=AggregationConfig().norm_factor,
        help="reject outputs whose norm exceeds this many times the median of the other "
        "branches' norms; only in layers with a branch that has no calibrated bound",
    )
    add_defense_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=lim.max_new_tokens)
    p.add_argument("--max-prompt-tokens", type=int, default=lim.max_prompt_tokens)
    add_rpc_limit_argument(p, lim.max_concurrent_rpcs)
    p.add_argument(
        "--max-requests-per-client",
        type=int,
        default=lim.max_requests_per_client,
        help="Generate/Score calls one client (certificate, token or host) may run at once",
    )
    p.add_argument(
        "--max-batch-steps",
        type=int,
        default=bat.max_batch_steps,
        help="session steps one Forward carries (continuous batching)",
    )
    p.add_argument(
        "--gather-ms",
        type=float,
        default=bat.gather_ms,
        help="longest wait of a layer for other live generations to join its batch (0: off)",
    )
    p.add_argument(
        "--wire-dtype",
        choices=WIRE_DTYPES,
        default="auto",
        help="dtype of layer inputs and branch outputs on the wire: auto (each node's own "
        "compute dtype, from Describe), or float32, bfloat16, float16 for every node (half the "
        "bytes of float32, at a small cost in accuracy: mbt-aggregator-bench --wire-dtypes)",
    )
    add_expansion_arguments(p)
    p.add_argument(
        "--device",
        default="cpu",
        help="where the trunk runs (embedding, LM head, sampling): cpu or cuda[:N]; layer "
        "fusion stays on the CPU, next to the network",
    )
    add_log_arguments(p)
    return p


def add_expansion_arguments(p: argparse.ArgumentParser) -> None:
    exp = ExpansionConfig()
    g = p.add_argument_group(
        "live expansion",
        "a signed manifest of a later version that only adds branches (mbt expand) is taken "
        "without a restart, on SIGHUP or when the --artifacts folder changes; its new branches "
        "ramp in while a probe text measures their drift",
    )
    g.add_argument(
        "--watch-artifacts",
        type=float,
        default=exp.watch_s,
        metavar="SECONDS",
        help="how often to look for a changed --artifacts folder (0: only on SIGHUP)",
    )
    g.add_argument(
        "--expand-max-kl",
        type=float,
        default=exp.max_kl,
        help="largest drift (KL of the probe's next-token distributions from beta 0, nats "
        "per token) before the ramp is stopped",
    )
    g.add_argument(
        "--expand-max-ppl-increase",
        type=float,
        default=exp.max_ppl_increase,
        help="largest rise of the probe's perplexity over the old model's, as a fraction",
    )
    g.add_argument(
        "--expand-on-limit",
        choices=ACTIONS,
        default=exp.on_limit,
        help="past a limit: roll back to the old model, or freeze beta where it is",
    )
    g.add_argument(
        "--expand-probe",
        type=Path,
        default=None,
        metavar="FILE",
        help="UTF-8 text the drift is measured on (default: a built-in passage; up to one "
        "context window of it is used)",
    )
    g.add_argument(
        "--expand-probe-interval",
        type=float,
        default=exp.probe_interval_s,
        metavar="SECONDS",
        help="seconds between two drift probes during a ramp",
    )


def expansion_from_args(args: argparse.Namespace) -> ExpansionConfig:
    text = None
    if args.expand_probe is not None:
        try:
            text = args.expand_probe.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--expand-probe {args.expand_probe}: cannot read it ({exc})") from exc
    return ExpansionConfig(
        watch_s=args.watch_artifacts,
        max_kl=args.expand_max_kl,
        max_ppl_increase=args.expand_max_ppl_increase,
        on_limit=args.expand_on_limit,
        probe_interval_s=args.expand_probe_interval,
        probe_text=text,
    )


def config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    policy = FanoutPolicy(
        mode=args.policy,
        request_timeout_s=args.request_timeout_s,
        quorum_branches=args.quorum_branches,
        quorum_weight=args.quorum_weight,
        grace_ms=args.grace_ms,
        deadline_ms=args.deadline_ms,
        min_branches=args.min_branches,
        hedge=args.hedge,
    )
    tls = tls_config_from_args(args)
    return AggregatorConfig(
        artifacts=args.artifacts,
        trust=trust_config_from_args(args),
        state_file=args.state_file,
        listen=args.listen,
        http_listen=args.http_listen,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        peers=args.peers,
        mdns=args.mdns,
        interface=args.interface,
        allowed_node_ids=frozenset(args.allow_node) if args.allow_node else None,
        roster=args.roster,
        tls=tls,
        insecure=args.insecure,
        wire_dtype=args.wire_dtype,
        device=args.device,
        api_auth=ApiAuth(args.api_auth or ("cert" if tls.enabled else "none"), args.api_token_file),
        policy=policy,
        aggregation=AggregationConfig(mode=args.aggregation, norm_factor=args.norm_factor),
        limits=GatewayLimits(
            max_new_tokens=args.max_new_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_requests_per_client=args.max_requests_per_client,
        ),
        gather=GatherConfig(max_batch_steps=args.max_batch_steps, gather_ms=args.gather_ms),
        defense=defense_from_args(args),
        expansion=expansion_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_service(
        "mbt-aggregator",
        args.log_level,
        lambda: run_gateway(config_from_args(args)),
        args.log_format,
    )


if __name__ == "__main__":
    sys.exit(main())
