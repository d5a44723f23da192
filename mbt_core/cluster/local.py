"""A whole cluster on this machine: signed export, node processes, a gateway; always torn down.

Used by ``mbt cluster`` (the main demo) and by benchmarks. Nodes are separate processes on
127.0.0.1 that advertise over mDNS; the gateway also gets them as static peers, so it finds
them at once even where multicast is filtered.

For outage drills every node can be controlled on its own: killed, paused, resumed, restarted
with the same branches (on the same port, so the gateway's static peer list still reaches it,
or on a fresh one that only mDNS announces) and with extra arguments or environment; the
gateway can be restarted with other flags while the nodes keep running. A :class:`Placement`
puts a node elsewhere, e.g. in a network namespace.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mbt_core.artifacts.calibration import calibrated_bounds
from mbt_core.artifacts.export import export_artifacts, publish
from mbt_core.artifacts.manifest import read_manifest
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.checkpoint import Checkpoint, load_checkpoint
from mbt_core.trust.certs import init_ca, issue_cert
from mbt_core.trust.config import TlsConfig
from mbt_core.trust.keys import generate_key, load_private_key
from mbt_core.wire.gateway_client import Credentials
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc

_NODE_ID = re.compile(r"node id (\S+),")
_METRICS = re.compile(r"metrics on (http://\S+?/metrics)")


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


@dataclass(frozen=True)
class Placement:
    """Where one node process runs: its listen host and port (0: a free one), the address it
    advertises over mDNS, and the module started for it. A ``launcher`` other than the node's
    CLI gets ``launcher_args`` first and must exec ``mbt_node.cli`` in place (same pid), as
    one that enters a network namespace does, so that signals still reach the node."""

    host: str = "127.0.0.1"
    port: int = 0
    interface: str = "127.0.0.1"
    launcher: str = "mbt_node.cli"
    launcher_args: tuple[str, ...] = ()


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
    http_url: str = ""  # the gateway's OpenAI API, when gateway_args give --http-listen
    web_url: str = ""  # its web view, the same server's root
    # A signed export to serve instead of exporting ``checkpoint`` with a throw-away key.
    artifacts: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    placements: tuple[Placement, ...] = ()  # one per node; default: all on 127.0.0.1
    # Per node: extra arguments and environment (given here, or set by restart_node).
    node_extra: list[tuple[str, ...]] = field(default_factory=list)
    node_env: list[dict[str, str]] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # per node, of its current process
    # Mutual TLS everywhere (the default, as for every node and gateway): a throw-away CA in
    # the temp folder, a certificate per node (kept across restarts: same node id), the
    # gateway's, and a client's for ``credentials``. False: everything plaintext (--insecure).
    tls: bool = True
    # With TLS: clients of the gateway (gRPC and HTTP) show a bearer token, generated here,
    # instead of a client certificate: what a browser can show (``mbt cluster``, the web view).
    api_token: bool = False
    # Sign calibrated output-norm bounds into the export (as `mbt export` does by default).
    calibrate: bool = True
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _common: list[str] = field(default_factory=list)
    _env: dict[str, str] = field(default_factory=dict)
    _ports: list[int] = field(default_factory=list)
    _key: Path | None = None  # the throw-away signing key, when the cluster exported itself
    _base_nodes: int = 0  # nodes before an expansion added some

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
        self._env = {"MBT_STATE_DIR": str(root / "state")}
        if self.tls:
            init_ca(root / "ca")
        if self.artifacts is not None:
            if not self.trusted_keys:
                raise ValueError("serving an artifact folder needs at least one trusted key")
            artifacts, keys = self.artifacts, list(self.trusted_keys)
            branches = read_manifest(artifacts).config.branches
        else:
            ckpt = load_checkpoint(self.checkpoint)
            key = generate_key(root / "keys", "cluster")  # a throw-away key, deleted on close
            artifacts = root / "artifacts"
            # Calibrated like `mbt export` by default: the gateway checks every branch's bound.
            bounds = calibrated_bounds(ckpt)[0] if self.calibrate else None
            manifest = export_artifacts(ckpt, artifacts, norm_bounds=bounds)
            sign_manifest(artifacts, manifest, load_private_key(key.private_path))
            branches, keys = ckpt.model.cfg.branches, [key.public_path]
            self._key = key.private_path
        self._common = ["--artifacts", str(artifacts)]
        for key_path in keys:
            self._common += ["--trusted-key", str(key_path)]
        self.served = [s for s in self.layout.assign(branches) if s]
        if self.placements and len(self.placements) != len(self.served):
            raise ValueError(f"{len(self.placements)} placements for {len(self.served)} nodes")
        self.placements = self.placements or tuple(Placement() for _ in self.served)
        self._ports = [p.port for p in self.placements]
        n = len(self.served)
        self.node_extra = [tuple(a) for a in self.node_extra] or [() for _ in range(n)]
        self.node_env = [dict(e) for e in self.node_env] or [{} for _ in range(n)]
        if len(self.node_extra) != n or len(self.node_env) != n:
            raise ValueError(f"node_extra and node_env need one entry per node ({n})")
        # Nodes start in parallel (each spends seconds importing torch and loading). Every
        # process started is kept, also on Ctrl-C, so that close() stops it.
        slots: list[ManagedProcess | Exception | None] = [None] * n

        def spawn(i: int) -> None:
            try:
                slots[i] = self._spawn(i, self.node_extra[i], self.node_env[i])
            except Exception as exc:
                slots[i] = exc

        try:
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(spawn, range(n)))
        finally:
            self.nodes = [s for s in slots if isinstance(s, ManagedProcess)]
        failed = next((s for s in slots if isinstance(s, Exception)), None)
        if failed is not None:
            raise failed
        self.node_ids = [_node_id(node) for node in self.nodes]
        self._ports = [int(node.address.rsplit(":", 1)[1]) for node in self.nodes]
        self._start_gateway()
        self.wait_until_complete()

    def _spawn(
        self, i: int, extra: Sequence[str], env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        place = self.placements[i]
        serve = ",".join(f"{layer}:{b}" for layer, b in self.served[i])
        args = [
            *self._common,
            "--serve",
            serve,
            "--listen",
            f"{place.host}:{self._ports[i]}",
            "--interface",
            place.interface,
            *self.node_args,
            *self._tls_args(f"node{i}", "node"),
            *extra,
        ]
        return start_process(
            place.launcher, [*place.launcher_args, *args], env={**self._env, **(env or {})}
        )

    def _start_gateway(self) -> None:
        peers = ",".join(n.address for n in self.nodes)
        self.gateway = start_process(
            "mbt_aggregator.cli",
            [
                *self._common,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "0",
                "--peers",
                peers,
                *self._tls_args("gateway", "aggregator"),
                *self._api_auth_args(),
                *self.gateway_args,
            ],
            env=self._env,
        )
        found = re.search(r"metrics on (\S+?),", self.gateway.ready_line)
        self.metrics_url = found.group(1) if found else ""
        found = re.search(r"OpenAI API on (\S+?),", self.gateway.ready_line)
        self.http_url = found.group(1) if found else ""
        found = re.search(r"web view on (\S+?),", self.gateway.ready_line)
        self.web_url = found.group(1) if found else ""

    @property
    def served_artifacts(self) -> Path:
        """The signed export the nodes and the gateway serve."""
        if not self._common:
            raise RuntimeError("the cluster is not running")
        return Path(self._common[1])

    @property
    def address(self) -> str:
        if self.gateway is None:
            raise RuntimeError("the cluster is not running")
        return self.gateway.address

    def _tls_args(self, name: str, role: str) -> list[str]:
        if not self.tls or self._tmp is None:
            return ["--insecure"]
        cfg = self._tls_config(name, role)
        return ["--tls-cert", str(cfg.cert), "--tls-key", str(cfg.key), "--tls-ca", str(cfg.ca)]

    def _tls_config(self, name: str, role: str) -> TlsConfig:
        """``name``'s certificate, issued on first use."""
        root = Path(self._tmp.name)  # type: ignore[union-attr]
        cert, key = root / "certs" / f"{name}.crt", root / "certs" / f"{name}.key"
        if not cert.exists():
            issue_cert(root / "ca", name, root / "certs", role=role)
        return TlsConfig(cert, key, root / "ca" / "ca.crt")

    def _api_auth_args(self) -> list[str]:
        if not (self.tls and self.api_token):
            return []
        path = Path(self._tmp.name) / "api-token"  # type: ignore[union-attr]
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32) + "\n")
        return ["--api-auth", "token", "--api-token-file", str(path)]

    @property
    def api_token_file(self) -> Path | None:
        """The bearer token's file, with ``api_token`` (for ``--token-file``)."""
        if not (self.tls and self.api_token and self._tmp is not None):
            return None
        return Path(self._tmp.name) / "api-token"

    @property
    def credentials(self) -> Credentials:
        """What a client of this cluster's gateway presents: with TLS a client certificate, or
        the CA and the bearer token with ``api_token``; nothing without TLS."""
        if not self.tls:
            return Credentials()
        token_file = self.api_token_file
        if token_file is not None:
            ca = self._tls_config("client", "client").ca
            return Credentials(TlsConfig(ca=ca), token=token_file.read_text().strip())
        return Credentials(self._tls_config("client", "client"))

    def gateway_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The gateway's Prometheus samples now: (name, sorted labels) -> value."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    @property
    def node_metrics_urls(self) -> list[str]:
        """The /metrics of every node started with ``--metrics-port`` (in ``node_args``)."""
        found = (_METRICS.search(node.ready_line) for node in self.nodes)
        return [m.group(1) for m in found if m is not None]

    def describe_node(self, i: int, timeout_s: float = 5.0) -> pb.DescribeResponse:
        """Node ``i``'s Describe, asked as the gateway's peer would (an aggregator's
        certificate of its own with TLS)."""
        tls = self._tls_config("inspector", "aggregator") if self.tls else TlsConfig()
        with Credentials(tls).channel(self.nodes[i].address) as channel:
            stub = pb_grpc.BranchServiceStub(channel)
            return stub.Describe(pb.DescribeRequest(), timeout=timeout_s)

    def status(self) -> gw.StatusResponse:
        credentials = self.credentials
        with credentials.channel(self.address) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)
            return stub.Status(gw.StatusRequest(), timeout=5, metadata=credentials.metadata)

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

    # -- per-node control (outage drills) -------------------------------------------------

    def node_running(self, i: int) -> bool:
        """Whether node ``i``'s process exists (a paused one counts)."""
        return self.nodes[i].proc.poll() is None

    def kill_node(self, i: int) -> None:
        """SIGKILL: a crash, no draining, no mDNS goodbye."""
        self.nodes[i].kill()

    def pause_node(self, i: int) -> None:
        """SIGSTOP: the process holds its connections but answers nothing (a straggler)."""
        self.nodes[i].signal(signal.SIGSTOP)

    def resume_node(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGCONT)

    def restart_node(
        self,
        i: int,
        extra_args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        same_port: bool = True,
    ) -> ManagedProcess:
        """Start node ``i`` again with the same branches (killing it first if it runs).

        On the same port the gateway's static peer list reaches it again; on a fresh port only
        mDNS announces it. ``extra_args`` and ``env`` (added to the cluster's environment)
        replace the node's previous ones; None keeps them.
        """
        if self.node_running(i):
            self.kill_node(i)
        if not same_port:
            self._ports[i] = self.placements[i].port
        if extra_args is not None:
            self.node_extra[i] = tuple(extra_args)
        if env is not None:
            self.node_env[i] = dict(env)
        node = self._spawn(i, self.node_extra[i], self.node_env[i])
        self.nodes[i] = node
        self.node_ids[i] = _node_id(node)
        self._ports[i] = int(node.address.rsplit(":", 1)[1])
        return node

    def expand(self, grown: Checkpoint) -> list[int]:
        """A live expansion: ``grown`` (:func:`mbt_core.model.expand.expand_model`, with its
        schedule in ``info["expansion"]``) is exported as the next version, signed, published
        over the served folder, the gateway is told (SIGHUP), and one node per replica starts
        serving the new branches (found over mDNS). The running nodes keep their version.
        Returns the new nodes' indices."""
        if self._key is None or self._tmp is None or self.gateway is None:
            raise RuntimeError("only a running cluster that exported its model can expand")
        folder = self.served_artifacts
        current = read_manifest(folder)
        root = Path(self._tmp.name)
        if not self._base_nodes:  # the first expansion: keep what to go back to
            self._base_nodes = len(self.nodes)
            shutil.copytree(folder, root / "base-artifacts")
        release = root / f"v{current.model_version + 1}"
        bounds = calibrated_bounds(grown)[0] if self.calibrate else None
        manifest = export_artifacts(
            grown, release, model_version=current.model_version + 1, norm_bounds=bounds
        )
        sign_manifest(release, manifest, load_private_key(self._key))
        publish(release, folder)
        self.gateway.signal(signal.SIGHUP)
        old, new = current.config.branches, manifest.config.branches
        added = [(lay, b) for lay, k in enumerate(old) for b in range(k, new[lay])]
        start = len(self.nodes)
        for _ in range(self.layout.replicas):
            self.served.append(added)
            self.placements = (*self.placements, Placement())
            self._ports.append(0)
            self.node_extra.append(())
            self.node_env.append({})
            node = self._spawn(len(self.nodes), (), {})
            self.nodes.append(node)
            self.node_ids.append(_node_id(node))
        return list(range(start, len(self.nodes)))

    def revert_expansion(self) -> None:
        """Back to the model before :meth:`expand`: its nodes stopped, the served folder
        restored, a fresh gateway (the nodes that were there all along keep running)."""
        if not self._base_nodes or self._tmp is None:
            return
        for node in self.nodes[self._base_nodes :]:
            node.kill()
        n = self._base_nodes
        del self.nodes[n:], self.served[n:], self._ports[n:], self.node_ids[n:]
        del self.node_extra[n:], self.node_env[n:]
        self.placements = self.placements[:n]
        folder = self.served_artifacts
        shutil.rmtree(folder)
        shutil.copytree(Path(self._tmp.name) / "base-artifacts", folder)
        # The gateway recorded the later version as accepted (no rollback below it): this
        # throw-away cluster forgets it, as it goes back to the old release on purpose.
        shutil.rmtree(self._env["MBT_STATE_DIR"], ignore_errors=True)
        self._base_nodes = 0
        self.restart_gateway()

    def restart_gateway(self, gateway_args: Sequence[str] | None = None) -> None:
        """A fresh gateway (new registry, new port), optionally with other flags."""
        if gateway_args is not None:
            self.gateway_args = tuple(gateway_args)
        if self.gateway is not None:
            self.gateway.terminate(timeout_s=5)
            self.gateway = None
        self._start_gateway()

    def close(self) -> None:
        for proc in [self.gateway, *self.nodes]:
            if proc is not None:
                proc.terminate(timeout_s=5)
        self.nodes.clear()
        self.gateway = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _node_id(node: ManagedProcess) -> str:
    found = _NODE_ID.search(node.ready_line)
    return found.group(1) if found else ""
