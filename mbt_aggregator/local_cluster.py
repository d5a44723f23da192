"""A whole cluster on this machine: signed export, node processes, a gateway; always torn down.

Used by ``mbt cluster`` (the main demo) and by benchmarks. Nodes are separate processes on
127.0.0.1 that advertise over mDNS; the gateway also gets them as static peers, so it finds
them at once even where multicast is filtered.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mbt_core.checkpoint import load_checkpoint
from mbt_core.export import export_artifacts
from mbt_core.process import ManagedProcess, start_process
from mbt_core.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.signing import generate_key, load_private_key, sign_manifest


@dataclass(frozen=True)
class Layout:
    """``nodes`` processes; every branch on ``replicas`` of them, spread round-robin."""

    nodes: int = 4
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.nodes <= 0 or not 1 <= self.replicas <= self.nodes:
            raise ValueError(f"need nodes >= 1 and 1 <= replicas <= nodes, got {self}")

    def assign(self, branches: tuple[int, ...]) -> list[list[tuple[int, int]]]:
        served: list[list[tuple[int, int]]] = [[] for _ in range(self.nodes)]
        for layer, k in enumerate(branches):
            for b in range(k):
                for r in range(self.replicas):
                    served[(b + r) % self.nodes].append((layer, b))
        return served


@dataclass
class LocalCluster:
    checkpoint: Path | None = None  # default: the shipped model
    layout: Layout = field(default_factory=Layout)
    node_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    nodes: list[ManagedProcess] = field(default_factory=list)
    served: list[list[tuple[int, int]]] = field(default_factory=list)
    gateway: ManagedProcess | None = None
    metrics_url: str = ""
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mbt-cluster-")
        root = Path(self._tmp.name)
        ckpt = load_checkpoint(self.checkpoint)
        key = generate_key(root / "keys", "cluster")  # a throw-away key, deleted on close
        manifest = export_artifacts(ckpt, root / "artifacts")
        sign_manifest(root / "artifacts", manifest, load_private_key(key.private_path))
        env = {"MBT_STATE_DIR": str(root / "state")}
        common = ["--artifacts", str(root / "artifacts"), "--trusted-key", str(key.public_path)]
        self.served = [s for s in self.layout.assign(ckpt.model.cfg.branches) if s]
        for served in self.served:
            serve = ",".join(f"{layer}:{b}" for layer, b in served)
            self.nodes.append(
                start_process("mbt_node.cli", [*common, "--serve", serve, *self.node_args], env=env)
            )
        peers = ",".join(n.address for n in self.nodes)
        self.gateway = start_process(
            "mbt_aggregator.cli",
            [
                *common,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "0",
                "--peers",
                peers,
                *self.gateway_args,
            ],
            env=env,
        )
        found = re.search(r"metrics on (\S+?),", self.gateway.ready_line)
        self.metrics_url = found.group(1) if found else ""
        self.wait_until_complete()

    @property
    def address(self) -> str:
        if self.gateway is None:
            raise RuntimeError("the cluster is not running")
        return self.gateway.address

    def status(self) -> gw.StatusResponse:
        with grpc.insecure_channel(self.address) as channel:
            return gw_grpc.GatewayServiceStub(channel).Status(gw.StatusRequest(), timeout=5)

    def wait_until_complete(self, timeout_s: float = 30.0) -> gw.StatusResponse:
        """Wait until every branch has a live replica."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.branches and all(b.live_replicas > 0 for b in status.branches):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError("not every branch has a live replica")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in [self.gateway, *self.nodes]:
            if proc is not None:
                proc.terminate(timeout_s=5)
        self.nodes.clear()
        self.gateway = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
