"""Node configuration, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mbt_core.devices import check_device
from mbt_core.trust.config import TlsConfig, TrustConfig, check_transport
from mbt_core.wire.codec import COMPUTE_DTYPES

if TYPE_CHECKING:
    from mbt_node.faults import CorruptionFault


@dataclass(frozen=True)
class NodeLimits:
    """Bounds that keep a small machine alive under load; beyond them calls are refused.

    The per-caller quotas keep one caller's flood from taking the whole node: at half of the
    node each, a second caller always finds room. A gateway reads them from ``Describe`` and
    never opens more sessions than they allow.
    """

    max_sessions: int = 512
    max_cached_tokens: int = 262_144  # positions over all sessions and branches
    max_sessions_per_caller: int = 256
    max_cached_tokens_per_caller: int = 131_072
    max_steps_per_call: int = 256
    max_tokens_per_call: int = 4096
    max_message_bytes: int = 0  # 0: computed from the model (max_tokens_per_call x d_model)
    max_concurrent_rpcs: int = 512  # beyond: RESOURCE_EXHAUSTED (a gateway holds one stream)
    session_ttl_s: float = 300.0  # an idle session's caches are dropped after this

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_cached_tokens",
            "max_sessions_per_caller",
            "max_cached_tokens_per_caller",
            "max_steps_per_call",
            "max_tokens_per_call",
            "max_concurrent_rpcs",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_message_bytes < 0 or self.session_ttl_s <= 0:
            raise ValueError("max_message_bytes must be >= 0 and session_ttl_s > 0")

    def message_bytes(self, d_model: int, n_branches: int) -> int:
        """The receive/send cap: the largest legitimate Forward plus headroom for metadata."""
        if self.max_message_bytes:
            return self.max_message_bytes
        return self.max_tokens_per_call * d_model * 4 * max(1, n_branches) + (1 << 20)


@dataclass(frozen=True)
class BatchingConfig:
    """Merging of concurrent calls for one branch into one batched forward."""

    max_batch_steps: int = 64  # session steps in one batched forward
    max_wait_ms: float = 0.0  # extra wait for more calls; 0 merges what queued meanwhile
    # Batches of at most this many positions run on the event loop thread: for them a hop to
    # the torch thread and back costs more than the compute (decode steps are 1 position).
    inline_max_positions: int = 64
    # A call of at most this many positions that finds its branch idle runs at once, without a
    # hop through the batch worker (a lone generation's decode step). Larger calls always queue,
    # so that concurrent ones still merge into one batch.
    direct_max_positions: int = 8

    def __post_init__(self) -> None:
        if (
            self.max_batch_steps <= 0
            or min(self.max_wait_ms, self.inline_max_positions, self.direct_max_positions) < 0
        ):
            raise ValueError(
                "max_batch_steps must be positive; max_wait_ms, inline_max_positions and "
                "direct_max_positions >= 0"
            )


@dataclass(frozen=True)
class NodeConfig:
    artifacts: Path
    trust: TrustConfig  # who may sign the manifest: keys and threshold, or a trust root
    serve: tuple[tuple[int, int], ...]
    listen: str = "127.0.0.1:0"
    device: str = "cpu"
    dtype: str = "auto"  # the model's own (see mbt_node.runtime.compute_dtype)
    advertise: bool = True
    interface: str = "127.0.0.1"  # address advertised over mDNS and bound by zeroconf
    node_key: Path | None = None  # private key whose fingerprint is the node id
    tls: TlsConfig = field(default_factory=TlsConfig)  # with it: mTLS, id = cert fingerprint
    insecure: bool = False  # plaintext: only when asked for (secure by default)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1  # Prometheus /metrics; 0 picks a free port, -1 is off
    state_file: Path | None = None  # rollback-protection state (default: per user)
    torch_threads: int = 1  # several nodes often share one machine
    drain_grace_s: float = 10.0
    delay_ms: float = 0.0  # fault injection: extra latency of every Forward (a slow machine)
    test_fault: CorruptionFault | None = None  # tests only: corrupt outputs (mbt_node.faults)
    limits: NodeLimits = field(default_factory=NodeLimits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        if not self.serve:
            raise ValueError("a node must serve at least one branch (--serve L:B,...)")
        check_transport(self.tls, self.insecure)
        if self.tls.enabled and self.node_key is not None:
            raise ValueError("with TLS the node id is the certificate's; drop --node-key")
        if self.dtype not in ("auto", *COMPUTE_DTYPES):
            choices = ", ".join(("auto", *COMPUTE_DTYPES))
            raise ValueError(f"dtype must be one of {choices}, got {self.dtype!r}")
        check_device(self.device)
        if self.torch_threads <= 0:
            raise ValueError("torch_threads must be positive")
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
