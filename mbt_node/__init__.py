"""MBT branch node: hosts branches of a signed model behind ``mbt.v1.BranchService``."""

from mbt_node.config import BatchingConfig, NodeConfig, NodeLimits
from mbt_node.server import run_node

__all__ = ["BatchingConfig", "NodeConfig", "NodeLimits", "run_node"]
