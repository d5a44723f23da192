"""The node's own refusals of a request, beside the session refusals of ``mbt_core.errors``.

Raised where a request is checked; :data:`mbt_node.servicer.STATUS_OF` is the one table that
gives each its gRPC status code. Nothing here knows gRPC.
"""

from __future__ import annotations

from mbt_core.errors import MbtError


class NodeLoading(MbtError):
    """The node has not loaded its branches yet: try again shortly (or another replica)."""

    def __init__(self) -> None:
        super().__init__("node is loading its branches")


class InvalidRequest(MbtError):
    """A request no node could answer: malformed steps, inputs or branch lists."""


class BranchNotServed(MbtError):
    """The request names a branch this node does not serve."""
