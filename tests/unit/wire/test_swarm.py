"""The Status reply as ``mbt status --json`` and the web view get it: the policy field by field."""

from __future__ import annotations

import json

from mbt_aggregator.policy import FanoutPolicy
from mbt_aggregator.servicer import fanout_policy
from mbt_core.cli.commands.status import render
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.swarm import swarm


def through_the_wire(policy: FanoutPolicy) -> gw.StatusResponse:
    sent = gw.StatusResponse(
        model_id="m", policy=policy.summary(), fanout_policy=fanout_policy(policy)
    )
    return gw.StatusResponse.FromString(sent.SerializeToString())


def test_the_policy_is_its_fields_and_a_readable_summary() -> None:
    policy = FanoutPolicy(
        mode="quorum", quorum_branches=2, quorum_weight=0.7, grace_ms=3, min_branches=2, hedge=True
    )
    data = swarm(through_the_wire(policy))
    assert data["policy"] == {
        "mode": "quorum",
        "request_timeout_s": 10.0,
        "quorum_branches": 2,
        "quorum_weight": 0.7,
        "grace_ms": 3.0,
        "deadline_ms": 100.0,
        "min_branches": 2,
        "hedge": True,
        "summary": "quorum of 2 branches or 70% of the weight, grace 3 ms, hedged, timeout 10 s, "
        "at least 2 branch(es)",
    }
    assert json.loads(json.dumps(data)) == data
    head = render(data).splitlines()[0]
    assert head.endswith(
        "policy quorum of 2 branches or 70% of the weight, grace 3 ms, hedged, "
        "timeout 10 s, at least 2 branch(es)"
    )


def test_parameters_a_mode_does_not_set_are_null_not_zero() -> None:
    data = swarm(through_the_wire(FanoutPolicy(mode="deadline", deadline_ms=250)))
    policy = data["policy"]
    assert policy["mode"] == "deadline" and policy["deadline_ms"] == 250.0
    assert policy["quorum_branches"] is None and policy["quorum_weight"] is None
    assert policy["summary"].startswith("deadline 250 ms, timeout 10 s")


def test_a_gateway_older_than_the_structured_policy_shows_its_string() -> None:
    old = gw.StatusResponse(model_id="m", policy="FanoutPolicy(mode='all', hedge=False)")
    data = swarm(old)
    assert data["policy"] == {"summary": "FanoutPolicy(mode='all', hedge=False)"}
    assert "policy FanoutPolicy(mode='all'" in render(data)
