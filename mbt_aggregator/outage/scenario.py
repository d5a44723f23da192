"""Outage scenarios: a small TOML file per scenario, validated with errors that name the key.

A scenario is a list of fault events on nodes (by index in the layout, or ``"random"``, drawn
with the scenario's or the run's seed)::

    description = "SIGKILL node 0 after 1.5 s, restart it 1 s later"

    [[events]]
    action = "kill"
    node = 0
    at_s = 1.5              # seconds after the workload starts
    recover_after_s = 1.0   # optional: restart (kill), SIGCONT (pause), link up (partition)

Timed actions: ``kill`` (SIGKILL), ``pause`` (SIGSTOP, a straggler), ``flap`` (``cycles`` of
down for ``down_s`` then up for ``up_s``, ``via = "kill"`` or ``"pause"``), and with
``--netns`` ``partition`` (link down) and ``slow_link`` (``tc tbf`` at ``rate_kbit``). Start
options, in force from the start of the run (the node is started with them): ``slow``
(``delay_ms``, the node's ``--delay-ms``) and ``corrupt`` (``mode`` nan|huge|flip|random,
``rate``: the node's test-only ``--unsafe-test-fault``, a Byzantine node). ``expand`` (no
``node``) grows the model while it serves: the next version with ``add`` branches more per
layer is published to the gateway, new nodes serve them, and the gateway ramps them in over
``ramp_s`` (``--expand-checkpoint``: a grown model of ``mbt expand``; default: the served
model grown untrained, copies of its branches with noise).
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from mbt_core.errors import MbtError

TIMED = ("kill", "pause", "flap", "partition", "slow_link", "expand")
START_OPTIONS = ("slow", "corrupt")
NETNS_ONLY = ("partition", "slow_link")
CORRUPT_MODES = ("nan", "huge", "flip", "random")
FLAP_VIA = ("kill", "pause")
# Keys each action takes besides action, node (required) and at_s.
_KEYS: dict[str, frozenset[str]] = {
    "kill": frozenset({"recover_after_s"}),
    "pause": frozenset({"recover_after_s"}),
    "partition": frozenset({"recover_after_s"}),
    "slow_link": frozenset({"recover_after_s", "rate_kbit"}),
    "flap": frozenset({"cycles", "down_s", "up_s", "via"}),
    "slow": frozenset({"delay_ms"}),
    "corrupt": frozenset({"mode", "rate"}),
    "expand": frozenset({"add", "ramp_s"}),
}
NODELESS = ("expand",)  # actions on the cluster, not on one of its nodes
_TOP_KEYS = frozenset({"description", "seed", "events"})


class ScenarioError(MbtError):
    """A scenario file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class FaultEvent:
    action: str
    node: int | None  # None: "random", resolved by Scenario.resolve
    at_s: float = 0.0  # seconds after the workload starts (timed actions)
    recover_after_s: float | None = None  # None: the fault stays until the run ends
    cycles: int = 2  # flap
    down_s: float = 1.0  # flap
    up_s: float = 1.0  # flap
    via: str = "kill"  # flap
    rate_kbit: int = 256  # slow_link
    delay_ms: float = 0.0  # slow
    mode: str = "random"  # corrupt
    rate: float = 1.0  # corrupt
    add: int = 2  # expand: new branches per layer
    ramp_s: float = 6.0  # expand: the schedule's ramp

    @property
    def timed(self) -> bool:
        return self.action in TIMED


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    events: tuple[FaultEvent, ...] = ()
    seed: int | None = None  # for "random" choices; default: the run's --seed
    source: str = ""  # the file it came from, for messages

    @property
    def needs_netns(self) -> bool:
        return any(e.action in NETNS_ONLY for e in self.events)

    @property
    def expands(self) -> bool:
        return any(e.action == "expand" for e in self.events)

    @property
    def healthy(self) -> bool:
        return not self.events

    def resolve(self, n_nodes: int, seed: int) -> Scenario:
        """Every ``"random"`` node drawn (seeded), every node index checked against the layout."""
        rng = random.Random(self.seed if self.seed is not None else seed)
        events = []
        for i, event in enumerate(self.events):
            node = rng.randrange(n_nodes) if event.node is None else event.node
            if node >= n_nodes:
                raise ScenarioError(
                    f"{self.source or self.name}: events[{i}].node = {node}, but the layout "
                    f"has {n_nodes} nodes (0..{n_nodes - 1})"
                )
            events.append(replace(event, node=node))
        return replace(self, events=tuple(events))

    def last_fault_s(self) -> float:
        """When the last timed fault (or flap cycle) starts, at the earliest."""
        ends = [0.0]
        for e in self.events:
            if e.action == "flap":
                ends.append(e.at_s + (e.cycles - 1) * (e.down_s + e.up_s))
            elif e.timed:
                ends.append(e.at_s)
        return max(ends)


def parse_scenario(text: str, name: str, source: str = "") -> Scenario:
    where = source or name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{where}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})"
        )
    description = _typed(data, "description", str, where, "")
    seed = _typed(data, "seed", int, where, None)
    raw_events = data.get("events", [])
    if not isinstance(raw_events, list) or not all(isinstance(e, dict) for e in raw_events):
        raise ScenarioError(f"{where}: events must be an array of tables ([[events]])")
    events = tuple(_event(e, f"{where}: events[{i}]") for i, e in enumerate(raw_events))
    return Scenario(name, description, events, seed, source)


def _event(raw: dict[str, Any], where: str) -> FaultEvent:
    action = _typed(raw, "action", str, where, None)
    if action is None:
        raise ScenarioError(f"{where}: missing key 'action'")
    if action not in _KEYS:
        raise ScenarioError(
            f"{where}.action: unknown action {action!r} (one of {', '.join(_KEYS)})"
        )
    allowed = (
        _KEYS[action]
        | {"action"}
        | (set() if action in NODELESS else {"node"})
        | ({"at_s"} if action in TIMED else set())
    )
    unknown = sorted(set(raw) - allowed)
    if unknown:
        extra = " (start options apply from the start: no at_s)" if unknown[0] == "at_s" else ""
        raise ScenarioError(
            f"{where}: key {unknown[0]!r} does not apply to action {action!r}{extra} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    if action in NODELESS:
        raw = {**raw, "node": 0}  # the cluster grows: no node of the layout is touched
    if "node" not in raw:
        raise ScenarioError(f"{where}: missing key 'node' (an index, or \"random\")")
    node = raw["node"]
    if node != "random" and (isinstance(node, bool) or not isinstance(node, int) or node < 0):
        raise ScenarioError(f'{where}.node: expected an index >= 0 or "random", got {node!r}')
    kw: dict[str, Any] = {"action": action, "node": None if node == "random" else node}
    kw["at_s"] = _number(raw, "at_s", where, 0.0, minimum=0.0)
    if "recover_after_s" in raw:
        kw["recover_after_s"] = _number(raw, "recover_after_s", where, 0.0, minimum=0.0)
    for key in ("down_s", "up_s"):
        kw[key] = _number(raw, key, where, 1.0, minimum=0.0)
    kw["cycles"] = _typed(raw, "cycles", int, where, 2)
    if kw["cycles"] < 1:
        raise ScenarioError(f"{where}.cycles: must be at least 1, got {kw['cycles']}")
    kw["via"] = _choice(raw, "via", FLAP_VIA, where, "kill")
    kw["rate_kbit"] = _typed(raw, "rate_kbit", int, where, 256)
    if kw["rate_kbit"] < 8:
        raise ScenarioError(f"{where}.rate_kbit: must be at least 8, got {kw['rate_kbit']}")
    kw["delay_ms"] = _number(raw, "delay_ms", where, 0.0, minimum=0.0)
    if action == "slow" and kw["delay_ms"] <= 0:
        raise ScenarioError(f"{where}.delay_ms: a slow node needs delay_ms > 0")
    kw["mode"] = _choice(raw, "mode", CORRUPT_MODES, where, "random")
    kw["add"] = _typed(raw, "add", int, where, 2)
    if kw["add"] < 1:
        raise ScenarioError(f"{where}.add: must be at least 1, got {kw['add']}")
    kw["ramp_s"] = _number(raw, "ramp_s", where, 6.0, minimum=0.0)
    kw["rate"] = _number(raw, "rate", where, 1.0, minimum=0.0)
    if not 0 < kw["rate"] <= 1:
        raise ScenarioError(f"{where}.rate: must be in (0, 1], got {kw['rate']}")
    return FaultEvent(**kw)


def _typed(raw: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ScenarioError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _number(raw: dict[str, Any], key: str, where: str, default: float, minimum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{where}.{key}: expected a number, got {value!r}")
    if value < minimum:
        raise ScenarioError(f"{where}.{key}: must be >= {minimum:g}, got {value!r}")
    return float(value)


def _choice(
    raw: dict[str, Any], key: str, choices: tuple[str, ...], where: str, default: str
) -> str:
    value = _typed(raw, key, str, where, default)
    if value not in choices:
        raise ScenarioError(f"{where}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


# -- files and the shipped examples ----------------------------------------------------------


def shipped_names() -> list[str]:
    folder = resources.files("mbt_aggregator.outage") / "scenarios"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario file, or a shipped scenario by name (``mbt-bench outage --list``)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"{path}: cannot read scenario ({exc.strerror})") from exc
        return parse_scenario(text, path.stem, str(path))
    if name_or_path not in shipped_names():
        raise ScenarioError(
            f"no scenario {name_or_path!r}: give a .toml file or one of "
            f"{', '.join(shipped_names())}"
        )
    shipped = resources.files("mbt_aggregator.outage") / "scenarios" / f"{name_or_path}.toml"
    return parse_scenario(shipped.read_text(encoding="utf-8"), name_or_path, f"{name_or_path}.toml")
