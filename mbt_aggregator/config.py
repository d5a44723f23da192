"""Gateway configuration, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mbt_aggregator.engine import BatchingConfig
from mbt_aggregator.policy import FanoutPolicy
from mbt_core.config import AggregationConfig


@dataclass(frozen=True)
class GatewayLimits:
    max_new_tokens: int = 512  # per Generate request
    max_prompt_tokens: int = 4096
    max_score_tokens: int = 262_144

    def __post_init__(self) -> None:
        if min(self.max_new_tokens, self.max_prompt_tokens, self.max_score_tokens) <= 0:
            raise ValueError("gateway limits must be positive")


@dataclass(frozen=True)
class AggregatorConfig:
    artifacts: Path
    trusted_keys: tuple[Path, ...]
    threshold: int = 1
    state_file: Path | None = None
    listen: str = "127.0.0.1:7070"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9109  # 0 picks a free port; -1 disables the endpoint
    peers: tuple[str, ...] = ()
    mdns: bool = True
    interface: str = "127.0.0.1"
    allowed_node_ids: frozenset[str] | None = None
    policy: FanoutPolicy = field(default_factory=FanoutPolicy)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    admit_timeout_s: float = 2.0
    health_interval_s: float = 1.0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if not self.trusted_keys:
            raise ValueError("at least one --trusted-key is needed to verify the manifest")
        if not self.mdns and not self.peers:
            raise ValueError("with --no-mdns, give the nodes with --peers HOST:PORT,...")
