"""``--netns``: every node in its own network namespace, all on one bridge (root only).

Layout: a bridge ``<tag>b`` in the root namespace holds ``10.213.N.1/24`` (the gateway
browses mDNS and reaches the nodes there); node ``i`` lives in namespace ``<tag>n<i>`` with
``eth0`` = ``10.213.N.<i+2>``, the peer of ``<tag>v<i>`` on the bridge. mDNS therefore
crosses real (virtual) interfaces. A partition is ``ip link set <tag>v<i> down``; a slow link
is ``tc qdisc ... tbf`` on both ends of the pair. ``<tag>`` is ``mbto`` plus the bench's pid,
so a lab left over by a crashed run (its pid gone) is recognised and removed at the next start.

Nodes are started through :mod:`mbt_aggregator.outage.nsexec`, which execs ``ip netns exec``
in place, so the pid the bench holds is the node's own and SIGKILL/SIGSTOP reach it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from mbt_core.cluster.local import Placement
from mbt_core.errors import MbtError

PREFIX = "mbto"
NODE_PORT = 7001  # every node has its own namespace, so they can all use one port
_TBF_LATENCY_MS = 200  # how long a packet may queue in the shaper before it is dropped


class NetnsError(MbtError):
    """The namespaces cannot be set up here (not root, no ``ip``/``tc``, a command failed)."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetnsError(
            "--netns creates network namespaces, a bridge and tc qdiscs: run it as root"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsError(f"--netns needs the {tool!r} command (iproute2)")


def _run(*cmd: str, check: bool = True) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    """The bench pid encoded in a lab object's name, if it is one of ours."""
    digits = ""
    for ch in name[len(PREFIX) :]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if name.startswith(PREFIX) and digits else None


def _kill_inside(namespace: str) -> None:
    for pid in _run("ip", "netns", "pids", namespace, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def links() -> list[str]:
    names = []
    for line in _run("ip", "-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def remove_stale() -> list[str]:
    """Remove namespaces and links of labs whose bench process is gone; returns their names."""
    removed = []
    for ns in namespaces():
        owner = _owner(ns)
        if owner is not None and not _alive(owner):
            _kill_inside(ns)
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for link in links():
        owner = _owner(link)
        if owner is not None and not _alive(owner):
            _run("ip", "link", "del", link, check=False)
            removed.append(link)
    return removed


@dataclass
class NetnsLab:
    """The namespaces, veth pairs and bridge of one run; a context manager that always cleans."""

    n_nodes: int
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    subnet: str = field(default_factory=lambda: f"10.213.{os.getpid() % 250}")
    _made: list[tuple[str, str]] = field(default_factory=list)  # ("ns"|"link", name)

    def __post_init__(self) -> None:
        if not 1 <= self.n_nodes <= 200:
            raise ValueError(f"--netns supports 1..200 nodes, got {self.n_nodes}")
        if len(self.veth(self.n_nodes - 1)) > 15:  # IFNAMSIZ
            raise ValueError(f"lab tag {self.tag!r} too long for interface names")

    def namespace(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def veth(self, i: int) -> str:
        return f"{self.tag}v{i}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}b"

    @property
    def gateway_ip(self) -> str:
        return f"{self.subnet}.1"

    def node_ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 2}"

    def placement(self, i: int) -> Placement:
        ip = self.node_ip(i)
        return Placement(
            host=ip,
            port=NODE_PORT,
            interface=ip,
            launcher="mbt_aggregator.outage.nsexec",
            launcher_args=(self.namespace(i), "mbt_node.cli"),
        )

    def __enter__(self) -> NetnsLab:
        require_root()
        remove_stale()
        try:
            self._setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _setup(self) -> None:
        br = self.bridge
        _run("ip", "link", "add", br, "type", "bridge")
        self._made.append(("link", br))
        _run("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", br)
        _run("ip", "link", "set", br, "up")
        for i in range(self.n_nodes):
            ns, veth, peer = self.namespace(i), self.veth(i), f"{self.tag}p{i}"
            _run("ip", "netns", "add", ns)
            self._made.append(("ns", ns))
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            self._made.append(("link", veth))
            _run("ip", "link", "set", peer, "netns", ns)
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "link", "set", peer, "name", "eth0")
            _run(*inside, "ip", "addr", "add", f"{self.node_ip(i)}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run("ip", "link", "set", veth, "master", br)
            _run("ip", "link", "set", veth, "up")

    def partition(self, i: int) -> None:
        _run("ip", "link", "set", self.veth(i), "down")

    def heal(self, i: int) -> None:
        _run("ip", "link", "set", self.veth(i), "up")

    def shape(self, i: int, rate_kbit: int) -> None:
        """Token-bucket both directions of node ``i``'s link to ``rate_kbit``."""
        burst = max(1600, rate_kbit * 1000 // 8 // 100)  # bytes: at least one MTU, ~10 ms
        tbf = (
            "root", "tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst),
            "latency", f"{_TBF_LATENCY_MS}ms",
        )  # fmt: skip
        _run("tc", "qdisc", "replace", "dev", self.veth(i), *tbf)
        _run(
            "ip", "netns", "exec", self.namespace(i), "tc", "qdisc", "replace", "dev", "eth0", *tbf
        )

    def unshape(self, i: int) -> None:
        _run("tc", "qdisc", "del", "dev", self.veth(i), "root", check=False)
        ns = self.namespace(i)
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def cleanup(self) -> None:
        """Kill what still runs inside, delete namespaces, veths and bridge (idempotent)."""
        for kind, name in reversed(self._made):
            if kind == "ns":
                _kill_inside(name)
                _run("ip", "netns", "del", name, check=False)
            else:
                _run("ip", "link", "del", name, check=False)
        self._made.clear()
