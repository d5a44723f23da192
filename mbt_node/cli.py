"""``mbt-node``: serve some branches of a signed MBT model on this machine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mbt_core.cli.flags import (
    add_artifact_arguments,
    add_log_arguments,
    add_rpc_limit_argument,
    add_tls_arguments,
    tls_config_from_args,
    trust_config_from_args,
)
from mbt_core.cli.service import run_service
from mbt_core.wire.codec import COMPUTE_DTYPES
from mbt_core.wire.contract import parse_branches
from mbt_node.config import BatchingConfig, NodeConfig, NodeLimits
from mbt_node.faults import ENABLE_ENV, CorruptionFault, parse_fault, require_enabled
from mbt_node.server import run_node

EPILOG = """\
examples:
  mbt-node --artifacts model/ --trusted-key owner.public.pem --serve 0:0,1:0 \
      --tls-cert certs/node1.crt --tls-key certs/node1.key --tls-ca ca/ca.crt
  mbt-node --artifacts model/ --trusted-key owner.public.pem --serve 0:0,1:0 --insecure

The node verifies the manifest's signatures, expiry and version, loads only the branch files it
serves (each checked against its SHA-256 in the manifest), then answers gRPC on --listen and
advertises itself over mDNS as _mbt._tcp.local. on --interface. SIGTERM drains and exits 0.
It speaks mutual TLS (--tls-cert/--tls-key/--tls-ca from mbt certs issue --role node): it
answers only the gateway's certificate (health checks: any cluster certificate), and its node
id is the certificate's fingerprint. Plaintext needs --insecure, and says what it gives up.
Every session belongs to the caller that opened it; each caller has quotas of sessions and
cached positions (--max-sessions-per-caller, --max-cached-tokens-per-caller), and a full node
makes room for a gateway's certificate from anonymous callers' idle sessions.
"""


def build_parser() -> argparse.ArgumentParser:
    lim, bat = NodeLimits(), BatchingConfig()
    p = argparse.ArgumentParser(
        prog="mbt-node",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_artifact_arguments(p)
    add_tls_arguments(p)
    p.add_argument(
        "--serve",
        type=parse_branches,
        required=True,
        metavar="L:B[,L:B...]",
        help="branches to serve, as layer:branch pairs",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="gRPC address (port 0 picks a free one; 0.0.0.0:PORT for a LAN)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--dtype",
        choices=("auto", *COMPUTE_DTYPES),
        default="auto",
        help="compute dtype; auto: the model's own (float16 models compute in float32 on a CPU)",
    )
    p.add_argument(
        "--advertise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="announce the node over mDNS/DNS-SD",
    )
    p.add_argument(
        "--interface", default="127.0.0.1", help="IPv4 address to advertise on and bind mDNS to"
    )
    p.add_argument(
        "--node-key",
        type=Path,
        default=None,
        help="private key (mbt keys generate) whose fingerprint is the node id (without TLS)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--max-sessions", type=int, default=lim.max_sessions)
    p.add_argument("--max-cached-tokens", type=int, default=lim.max_cached_tokens)
    p.add_argument(
        "--max-sessions-per-caller",
        type=int,
        default=lim.max_sessions_per_caller,
        help="sessions one caller (a certificate, or a host without TLS) may hold",
    )
    p.add_argument(
        "--max-cached-tokens-per-caller",
        type=int,
        default=lim.max_cached_tokens_per_caller,
        help="positions one caller may have cached",
    )
    p.add_argument("--max-steps-per-call", type=int, default=lim.max_steps_per_call)
    p.add_argument("--max-tokens-per-call", type=int, default=lim.max_tokens_per_call)
    add_rpc_limit_argument(p, lim.max_concurrent_rpcs)
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=0,
        help="largest gRPC message (0: computed from the model and the call limits)",
    )
    p.add_argument(
        "--session-ttl-s",
        type=float,
        default=lim.session_ttl_s,
        help="idle seconds before a session's caches are dropped",
    )
    p.add_argument(
        "--max-batch-steps",
        type=int,
        default=bat.max_batch_steps,
        help="session steps merged into one batched forward",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=bat.max_wait_ms,
        help="extra wait for more calls to merge (0: merge what queued meanwhile)",
    )
    p.add_argument(
        "--inline-max-positions",
        type=int,
        default=bat.inline_max_positions,
        help="batches up to this many positions run on the event loop thread",
    )
    p.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="fault injection: add this latency to every Forward (a slow machine)",
    )
    p.add_argument(
        "--unsafe-test-fault",
        type=_fault_spec,
        default=None,
        metavar="corrupt=nan|huge|flip|random[,rate=R][,seed=S]",
        help=f"TESTS ONLY: corrupt this node's Forward outputs (a Byzantine node); refused "
        f"unless {ENABLE_ENV}=1 is set",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="Prometheus /metrics port (batches, compute time, refusals, sessions; 0: a free "
        "port, -1: off)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1")
    add_log_arguments(p)
    return p


def _fault_spec(text: str) -> CorruptionFault:
    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        artifacts=args.artifacts,
        trust=trust_config_from_args(args),
        serve=args.serve,
        listen=args.listen,
        device=args.device,
        dtype=args.dtype,
        advertise=args.advertise,
        interface=args.interface,
        node_key=args.node_key,
        tls=tls_config_from_args(args),
        insecure=args.insecure,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        state_file=args.state_file,
        torch_threads=args.torch_threads,
        delay_ms=args.delay_ms,
        test_fault=require_enabled(args.unsafe_test_fault, os.environ),
        limits=NodeLimits(
            max_sessions=args.max_sessions,
            max_cached_tokens=args.max_cached_tokens,
            max_sessions_per_caller=args.max_sessions_per_caller,
            max_cached_tokens_per_caller=args.max_cached_tokens_per_caller,
            max_steps_per_call=args.max_steps_per_call,
            max_tokens_per_call=args.max_tokens_per_call,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_message_bytes=args.max_message_bytes,
            session_ttl_s=args.session_ttl_s,
        ),
        batching=BatchingConfig(
            max_batch_steps=args.max_batch_steps,
            max_wait_ms=args.batch_wait_ms,
            inline_max_positions=args.inline_max_positions,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_service(
        "mbt-node", args.log_level, lambda: run_node(config_from_args(args)), args.log_format
    )


if __name__ == "__main__":
    sys.exit(main())
