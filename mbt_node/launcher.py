"""Start ``mbt-node`` as a separate process (tests, benchmarks, demos)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mbt_core.cluster.process import ManagedProcess, StartError, start_process

_NODE_ID = re.compile(r"node id (\S+),")

__all__ = ["ManagedProcess", "StartError", "node_id", "start_node"]


def start_node(
    args: Sequence[str], timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> ManagedProcess:
    """Run ``mbt-node ARGS`` and wait until it serves."""
    return start_process("mbt_node.cli", args, timeout_s, env)


def node_id(node: ManagedProcess) -> str:
    """The node id the node printed in its ready line."""
    match = _NODE_ID.search(node.ready_line)
    if match is None:
        raise ValueError(f"no node id in {node.ready_line!r}")
    return match.group(1)
