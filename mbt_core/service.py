"""The entry point shared by the long-running processes (node, gateway), and their security flags.

The event loop is chosen here, at the entry point only (uvloop); user errors become one line on
stderr and exit code 2, with no traceback. The flags that node, gateway and gateway clients
share are defined once here: the signed model and who may sign it (PEM keys or a trust root),
the cluster TLS files, and bearer tokens. Only paths and checks live here; the gRPC credentials
are built in ``mbt_node`` and ``mbt_aggregator`` (``mbt_core`` knows nothing of gRPC).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from mbt_core.certs import (
    MAX_PEM_BYTES,
    TlsMaterial,
    certificate_role,
    load_tls_material,
    public_key_fingerprint,
)
from mbt_core.errors import CertificateError, MbtError
from mbt_core.fileio import read_capped
from mbt_core.trust_root import STATE_FILE as ROOTS_STATE_FILE
from mbt_core.trust_root import resolve_trust_root

if TYPE_CHECKING:
    from mbt_core.artifacts import Trust

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16  # a short token could be guessed by anyone on the LAN


def run_service(prog: str, log_level: str, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run ``main()`` on uvloop; ``main`` is a factory so that building it may fail cleanly."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        uvloop.run(main())
    except (MbtError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def settle_heap() -> None:
    """Once a service is up: collect, then hide what is left (modules, the model, the server)
    from the cyclic collector. It lives as long as the process, and the collections that every
    request's garbage triggers then no longer walk it."""
    gc.collect()
    gc.freeze()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the service then drains and exits 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# --- who may sign the manifest (and a roster) -------------------------------------------------


@dataclass(frozen=True)
class TrustConfig:
    """PEM public keys with a threshold, or a pinned trust root and its rotations (`mbt trust`).

    A root's own threshold is a floor that ``threshold`` may only raise.
    """

    keys: tuple[Path, ...] = ()
    threshold: int = 1
    root: Path | None = None
    root_updates: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.keys and self.root is not None:
            raise ValueError("give either --trusted-key or --root, not both")
        if not self.keys and self.root is None:
            raise ValueError("give --trusted-key (one or more) or --root to verify the manifest")
        if self.root_updates and self.root is None:
            raise ValueError("--root-update needs the pinned --root it rotates from")

    def resolve(self, state_file: Path | None = None) -> Trust:
        """The keys, or the root in force after the updates (raises TrustRootError).

        Accepted roots are recorded next to ``state_file`` (the rollback state), so that a
        restart with only the pinned root still trusts the rotated one.
        """
        if self.root is None:
            return list(self.keys)
        roots_state = None if state_file is None else Path(state_file).parent / ROOTS_STATE_FILE
        return resolve_trust_root(self.root, self.root_updates, roots_state)


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


# --- cluster TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate and key and the cluster CA (`mbt certs`); none: plaintext.

    A server needs all three. A gateway client may give only the CA (token auth over TLS).
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.cert is not None and self.ca is None:
            raise ValueError("--tls-cert needs --tls-ca (the cluster CA certificate)")

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def load(self, role: str | None = None) -> TlsMaterial:
        """Certificate, key and CA, checked against each other; with ``role``, the role the
        certificate must have been issued for (``mbt certs issue --role``)."""
        if self.cert is None or self.key is None or self.ca is None:
            raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        material = load_tls_material(self.cert, self.key, self.ca)
        held = certificate_role(material.cert_pem)
        if role is not None and held != role:
            raise CertificateError(
                f"{self.cert}: is a {held or 'role-less'} certificate; this process needs one "
                f"issued with --role {role}"
            )
        return material

    def ca_pem(self) -> bytes:
        """The CA certificate alone (a client that only verifies the server)."""
        if self.ca is None:
            raise ValueError("no --tls-ca given")
        try:
            pem = read_capped(self.ca, MAX_PEM_BYTES)
        except (OSError, ValueError) as exc:
            raise CertificateError(f"{self.ca}: cannot read the CA certificate ({exc})") from exc
        public_key_fingerprint(pem)  # a clear error for a file that is not a certificate
        return pem


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


def check_transport(tls: TlsConfig, insecure: bool) -> None:
    """Secure by default: a server runs mutual TLS unless the operator says ``--insecure``."""
    if tls.enabled and insecure:
        raise ValueError("--insecure and --tls-cert/--tls-key/--tls-ca exclude each other")
    if not tls.enabled and not insecure:
        raise ValueError(
            "no TLS: give --tls-cert, --tls-key and --tls-ca (make them with `mbt certs init` "
            "and `mbt certs issue`), or --insecure to run plaintext on a network you trust"
        )


def warn_plaintext(prog: str) -> None:
    """The one warning line a service prints when it starts with ``--insecure``: what it
    gives up."""
    print(
        f"{prog}: warning: --insecure: plaintext gRPC. Callers are not authenticated (any host "
        "that reaches the port may call it), node ids are claims, sessions are bound only by "
        "secrets sent in clear, and traffic can be read and changed on the way: use it only on "
        "a network you trust",
        file=sys.stderr,
        flush=True,
    )


def read_token(path: Path) -> str:
    """A bearer token from a file, surrounding whitespace dropped; printable ASCII only."""
    try:
        data = read_capped(path, MAX_TOKEN_BYTES)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the token ({exc.strerror})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: not a token file ({exc})") from exc
    token = data.strip()
    if not token.isascii() or not all(33 <= c < 127 for c in token):
        raise ValueError(f"{path}: a token is printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{path}: a token needs at least {MIN_TOKEN_CHARS} characters")
    return token.decode("ascii")


# --- clients of a gateway (mbt generate/eval --gateway) -------------------------------------


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
