"""The flags that node, gateway and gateway clients share, defined once.

The signed model and who may sign it (PEM keys or a trust root), the cluster TLS files,
per-client RPC limits, logging, and the ``--gateway`` client flags with their bearer token.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mbt_core.trust.config import TlsConfig, TrustConfig, read_token

if TYPE_CHECKING:
    from mbt_core.wire.gateway_client import Credentials


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` of a long-running process."""
    from mbt_core.cli.logs import LOG_FORMATS

    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=LOG_LEVELS,
        help="INFO adds routine events (admissions, departures, draining); WARNING and above "
        "want someone to look (default %(default)s)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or json: one JSON object a line (time, level, logger, message) for "
        "log shippers (default %(default)s)",
    )


def add_artifact_arguments(p: argparse.ArgumentParser) -> None:
    """The signed model a service runs: folder, trusted keys or root, threshold, state."""
    p.add_argument("--artifacts", type=Path, required=True, help="artifact folder (mbt export)")
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        help="public key trusted to sign the manifest; repeat for several (or use --root)",
    )
    p.add_argument("--threshold", type=int, default=1, help="trusted signatures required")
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="ROOT.json",
        help="pinned trust root (mbt trust init) instead of --trusted-key",
    )
    p.add_argument(
        "--root-update",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="ROOT.json",
        help="rotated trust roots (mbt trust rotate), in version order: v2 v3 ...",
    )
    p.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="rollback-protection state (default: $MBT_STATE_DIR or ~/.local/state/mbt); "
        "accepted trust roots are kept beside it",
    )


def add_rpc_limit_argument(p: argparse.ArgumentParser, default: int) -> None:
    """``--max-concurrent-rpcs`` of a server: grpc refuses calls beyond it."""
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=default,
        help="calls served at once; beyond them RESOURCE_EXHAUSTED",
    )


def trust_config_from_args(args: argparse.Namespace) -> TrustConfig:
    return TrustConfig(
        keys=tuple(args.trusted_key),
        threshold=args.threshold,
        root=args.root,
        root_updates=tuple(args.root_update),
    )


def add_tls_arguments(p: argparse.ArgumentParser, *, client: bool = False) -> None:
    """``--tls-cert/--tls-key/--tls-ca``; a server with them speaks mutual TLS only, and a
    server without them starts only with ``--insecure``."""
    g = p.add_argument_group("TLS (files from mbt certs)")
    who = "client" if client else "this process's"
    g.add_argument("--tls-cert", type=Path, default=None, help=f"{who} certificate (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    g.add_argument("--tls-ca", type=Path, default=None, help="the cluster CA certificate")
    if not client:
        g.add_argument(
            "--insecure",
            action="store_true",
            help="run plaintext, without TLS: no caller is authenticated, node ids are only "
            "claims and traffic can be read and changed on the way (a trusted network only)",
        )


def tls_config_from_args(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def add_gateway_client_arguments(p: argparse.ArgumentParser, help: str) -> None:
    """``--gateway`` with the credentials a secured gateway asks for."""
    p.add_argument(
        "--gateway",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=None,
        help=f"{help}; several: fail over to the next when one is unreachable",
    )
    add_tls_arguments(p, client=True)
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="bearer token for a gateway started with --api-auth token",
    )


def gateway_credentials(args: argparse.Namespace) -> Credentials:
    """What the ``--gateway`` client flags name: TLS files and a bearer token."""
    from mbt_core.wire.gateway_client import Credentials  # gRPC only for commands that call out

    token = read_token(args.token_file) if args.token_file is not None else None
    return Credentials(tls_config_from_args(args), token)
