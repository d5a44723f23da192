"""Scenario files: the shipped ones parse, bad ones fail with a message naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbt_aggregator.outage.faults import TEST_FAULTS_ENV, NodeSetup, node_setups
from mbt_aggregator.outage.scenario import (
    FaultEvent,
    ScenarioError,
    load_scenario,
    parse_scenario,
    shipped_names,
)
from mbt_node.faults import ENABLE_ENV, parse_fault

CRASH = """
description = "kill and restart"

[[events]]
action = "kill"
node = 1
at_s = 2.5
recover_after_s = 1
"""


def test_shipped_scenarios_all_parse_and_cover_every_fault_kind() -> None:
    names = shipped_names()
    assert {"healthy", "crash", "pause", "slow", "flapping", "byzantine"} <= set(names)
    actions = set()
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.description
        actions |= {e.action for e in scenario.events}
    assert actions == {
        "kill",
        "pause",
        "slow",
        "flap",
        "corrupt",
        "partition",
        "slow_link",
        "expand",
    }
    assert load_scenario("expand").expands and not load_scenario("crash").expands
    assert load_scenario("healthy").healthy
    assert load_scenario("partition").needs_netns and not load_scenario("crash").needs_netns


def test_a_valid_file_gives_typed_events(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(CRASH)
    scenario = load_scenario(str(path))
    assert scenario.name == "mine" and scenario.source == str(path)
    assert scenario.events == (FaultEvent("kill", 1, at_s=2.5, recover_after_s=1.0),)
    assert scenario.last_fault_s() == 2.5


def test_flap_timing_and_defaults() -> None:
    s = parse_scenario(
        '[[events]]\naction = "flap"\nnode = 0\nat_s = 1\ncycles = 3\ndown_s = 0.5\nup_s = 2\n',
        "f",
    )
    (e,) = s.events
    assert (e.cycles, e.down_s, e.up_s, e.via) == (3, 0.5, 2.0, "kill")
    assert s.last_fault_s() == pytest.approx(1 + 2 * 2.5)


def test_random_nodes_are_drawn_from_the_seed_and_checked_against_the_layout() -> None:
    text = '[[events]]\naction = "pause"\nnode = "random"\nat_s = 1\n'
    s = parse_scenario(text, "r")
    assert s.events[0].node is None
    draws = {s.resolve(8, seed).events[0].node for seed in range(40)}
    assert len(draws) > 1 and draws <= set(range(8))
    assert s.resolve(8, 5) == s.resolve(8, 5)
    pinned = parse_scenario("seed = 3\n" + text, "r")
    assert {pinned.resolve(8, seed).events[0].node for seed in range(10)} == {
        pinned.resolve(8, 0).events[0].node
    }
    with pytest.raises(ScenarioError, match=r"events\[0\].node = 1, but the layout has 1 nodes"):
        parse_scenario(CRASH, "c", "c.toml").resolve(1, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("description = [", "not valid TOML"),
        ("colour = 1", "unknown key 'colour'"),
        ("description = 3", "description: expected str"),
        ("seed = 1.5", "seed: expected int"),
        ("events = 3", "events must be an array of tables"),
        ("[[events]]\nnode = 0", r"events\[0\]: missing key 'action'"),
        ('[[events]]\naction = "explode"\nnode = 0', r"events\[0\].action: unknown action"),
        ('[[events]]\naction = "kill"', r"events\[0\]: missing key 'node'"),
        ('[[events]]\naction = "kill"\nnode = -1', r"events\[0\].node: expected an index"),
        ('[[events]]\naction = "kill"\nnode = "first"', r"events\[0\].node: expected an index"),
        ('[[events]]\naction = "kill"\nnode = true', r"events\[0\].node: expected an index"),
        ('[[events]]\naction = "kill"\nnode = 0\nat_s = -1', r"events\[0\].at_s: must be >= 0"),
        ('[[events]]\naction = "kill"\nnode = 0\nat_s = "2"', r"events\[0\].at_s: expected a num"),
        ('[[events]]\naction = "kill"\nnode = 0\nat_s = nan', r"at_s: expected a number"),
        ('[[events]]\naction = "kill"\nnode = 0\ndelay_ms = 5', "'delay_ms' does not apply"),
        ('[[events]]\naction = "slow"\nnode = 0\nat_s = 1', "no at_s"),
        ('[[events]]\naction = "slow"\nnode = 0', "needs delay_ms > 0"),
        ('[[events]]\naction = "corrupt"\nnode = 0\nmode = "zero"', r"mode: expected one of"),
        ('[[events]]\naction = "corrupt"\nnode = 0\nrate = 0', r"rate: must be in \(0, 1\]"),
        ('[[events]]\naction = "flap"\nnode = 0\ncycles = 0', "cycles: must be at least 1"),
        ('[[events]]\naction = "flap"\nnode = 0\nvia = "link"', "via: expected one of kill"),
        ('[[events]]\naction = "slow_link"\nnode = 0\nrate_kbit = 1', "rate_kbit: must be at"),
    ],
)
def test_invalid_files_name_the_file_and_the_key(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as exc:
        parse_scenario(text, "bad", "bad.toml")
    assert str(exc.value).startswith("bad.toml")


def test_unknown_names_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"no scenario 'nope': give a \.toml file or one of"):
        load_scenario("nope")
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(str(tmp_path / "missing.toml"))


def test_start_options_become_node_arguments_the_node_accepts() -> None:
    text = (
        '[[events]]\naction = "slow"\nnode = 0\ndelay_ms = 25\n'
        '[[events]]\naction = "corrupt"\nnode = 1\nmode = "flip"\nrate = 0.5\n'
        '[[events]]\naction = "kill"\nnode = 1\nat_s = 1\n'
    )
    setups = node_setups(parse_scenario(text, "s"), 3, seed=4)
    assert setups[0] == NodeSetup(("--delay-ms", "25"))
    assert setups[2] == NodeSetup()
    flag, spec = setups[1].args
    assert flag == "--unsafe-test-fault"
    assert str(parse_fault(spec)) == "corrupt=flip,rate=0.5,seed=4"
    assert dict(setups[1].env) == {TEST_FAULTS_ENV: "1"}
    assert TEST_FAULTS_ENV == ENABLE_ENV


def test_an_expansion_names_no_node_and_checks_its_keys() -> None:
    text = "description = 'grow'\n[[events]]\naction = 'expand'\nat_s = 2\nadd = 3\nramp_s = 4\n"
    (event,) = parse_scenario(text, "grow").events
    assert (event.action, event.add, event.ramp_s, event.at_s) == ("expand", 3, 4.0, 2.0)
    with pytest.raises(ScenarioError, match="key 'node' does not apply"):
        parse_scenario(text + "node = 1\n", "grow")
    with pytest.raises(ScenarioError, match="add: must be at least 1"):
        parse_scenario(text.replace("add = 3", "add = 0"), "grow")
