"""MBT aggregator gateway: fans each layer out to the branch nodes and fuses what answers.

Builds on ``mbt_core`` only; it never imports ``mbt_node``.
"""

from mbt_aggregator.policy import MODES, STOP_REASONS, Collected, FanoutPolicy, collect

__all__ = ["MODES", "STOP_REASONS", "Collected", "FanoutPolicy", "collect"]
