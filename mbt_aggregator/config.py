"""Gateway configuration, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mbt_aggregator.auth import ApiAuth
from mbt_aggregator.defense import DefenseConfig
from mbt_aggregator.engine import GatherConfig
from mbt_aggregator.expansion import ExpansionConfig
from mbt_aggregator.policy import FanoutPolicy
from mbt_core.devices import check_device
from mbt_core.model.config import AggregationConfig
from mbt_core.trust.config import TlsConfig, TrustConfig, check_transport
from mbt_core.wire.codec import DTYPES

WIRE_DTYPES = ("auto", *DTYPES)


@dataclass(frozen=True)
class GatewayLimits:
    max_new_tokens: int = 512  # per Generate request
    max_prompt_tokens: int = 4096
    max_score_tokens: int = 262_144
    max_concurrent_rpcs: int = 256  # beyond: RESOURCE_EXHAUSTED from grpc itself
    max_requests_per_client: int = 16  # Generate/Score at once from one client

    def __post_init__(self) -> None:
        limits = (
            self.max_new_tokens,
            self.max_prompt_tokens,
            self.max_score_tokens,
            self.max_concurrent_rpcs,
            self.max_requests_per_client,
        )
        if min(limits) <= 0:
            raise ValueError("gateway limits must be positive")


@dataclass(frozen=True)
class AggregatorConfig:
    artifacts: Path
    trust: TrustConfig  # who may sign the manifest and the roster: keys, or a trust root
    state_file: Path | None = None
    listen: str = "127.0.0.1:7070"
    http_listen: str | None = None  # the OpenAI-compatible HTTP API; None: off
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9109  # 0 picks a free port; -1 disables the endpoint
    peers: tuple[str, ...] = ()
    mdns: bool = True
    interface: str = "127.0.0.1"
    allowed_node_ids: frozenset[str] | None = None
    roster: Path | None = None  # signed roster (mbt roster sign): only its node ids are admitted
    tls: TlsConfig = field(default_factory=TlsConfig)  # mTLS to nodes, TLS to clients
    insecure: bool = False  # plaintext: only when asked for (secure by default)
    # What layer inputs and branch outputs travel in: auto = each node's own compute dtype.
    wire_dtype: str = "auto"
    device: str = "cpu"  # where the trunk (embedding, head, sampling) runs
    api_auth: ApiAuth = field(default_factory=ApiAuth)  # who may call the gateway API
    policy: FanoutPolicy = field(default_factory=FanoutPolicy)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    gather: GatherConfig = field(default_factory=GatherConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    expansion: ExpansionConfig = field(default_factory=ExpansionConfig)
    admit_timeout_s: float = 2.0
    health_interval_s: float = 1.0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.api_auth.mode == "cert" and not self.tls.enabled:
            raise ValueError("--api-auth cert needs --tls-cert, --tls-key and --tls-ca")
        check_transport(self.tls, self.insecure)
        check_device(self.device)
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"--wire-dtype must be one of {', '.join(WIRE_DTYPES)}")
        if not self.mdns and not self.peers:
            raise ValueError("with --no-mdns, give the nodes with --peers HOST:PORT,...")
        if self.http_listen is not None:
            split_host_port(self.http_listen, "--http-listen")


def split_host_port(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6; port 0: a free one) as (host, port), or a
    ``ValueError`` that names ``flag``."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535 or "[" in host:
        raise ValueError(f"{flag} must be HOST:PORT (port 0..65535, [::1]:PORT), got {address!r}")
    return host, int(port)
