"""``mbt-bench outage``: the same workload healthy and under injected node faults.

``scenario`` (the TOML scenario files), ``faults`` (faults applied to a running cluster),
``netns`` (nodes in network namespaces), ``workload`` and ``baseline`` (what is measured),
``report`` and ``plots`` (what is written), ``runner`` (the benchmark), ``cli``. Only the
light scenario API is imported here: ``nsexec`` runs inside this package and must start fast.
"""

from mbt_aggregator.outage.scenario import (
    FaultEvent,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    shipped_names,
)

__all__ = [
    "FaultEvent",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
    "shipped_names",
]
