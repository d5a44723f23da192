"""Operable as shipped, against real processes: alerts that fire on the first event, quiet logs,
standard service answers, a machine-readable Status.

One node serving every branch of the tiny model and one gateway for the module, both logging
JSON at INFO; the gateway's ``--peers`` also names a port where nothing listens (a dead static
peer). Both are scraped once right after the node is admitted, before any request: the
"fresh" series the first two tests read. The log test runs last and waits until the gateway
has been up for ``WATCH_S`` seconds.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mbt_aggregator.generation import FAILURE_REASONS
from mbt_aggregator.metrics import (
    CALL_OUTCOMES,
    DISCOVERY_SOURCES,
    MEMBERSHIP_EVENTS,
    OUTPUT_REJECTIONS,
    REJECTION_REASONS,
)
from mbt_aggregator.reports import MASKED, REJECTED
from mbt_core.cli.main import main
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.wire.protocol.grpc.reflection.v1 import reflection_pb2 as v1
from mbt_core.wire.protocol.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_node.launcher import node_id, start_node
from mbt_node.metrics import EVENTS, LIMITS, kind_name
from mbt_node.servicer import STATUS_OF
from tests.integration.conftest import SignedModel
from tests.unit.test_deploy import ALERTS, alert_rules, promtool

pytestmark = [pytest.mark.integration]
SERVED = "0:0,0:1,1:0,1:1,1:2"  # every branch of the tiny model, branches (2, 3)
POLICY = ("--policy", "deadline", "--deadline-ms", "250", "--hedge")
LOGS = ("--log-level", "INFO", "--log-format", "json")
WATCH_S = 12.0  # how long the dead peer is watched before its log lines are counted
SERVING = health_pb2.HealthCheckResponse.SERVING
Series = tuple[str, tuple[tuple[str, str], ...]]  # name, sorted labels


def series(name: str, **labels: str) -> Series:
    return name, tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Scrape:
    """One /metrics page: counter and gauge samples (no histograms, no ``_created``)."""

    samples: dict[Series, float]

    @classmethod
    def of(cls, url: str) -> Scrape:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return cls(
            {
                series(s.name, **s.labels): s.value
                for family in text_string_to_metric_families(text)
                if family.type in ("counter", "gauge")
                for s in family.samples
                if not s.name.endswith("_created")
            }
        )


@dataclass(frozen=True)
class Site:
    node: ManagedProcess
    gateway: ManagedProcess
    node_id: str
    dead_peer: str
    ready_at: float  # time.monotonic() when the gateway said it was ready
    branches: tuple[int, ...]  # per layer
    gateway_metrics: str
    node_metrics: str
    web_view: str
    fresh_gateway: Scrape
    fresh_node: Scrape


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _url(ready_line: str, what: str) -> str:
    found = re.search(rf"{what} on (\S+?),?(\s|$)", ready_line)
    assert found, f"no {what} URL in {ready_line!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def site(signed_model: SignedModel) -> Iterator[Site]:
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    node = start_node(
        signed_model.node_args(SERVED, "--no-advertise", "--metrics-port", "0", *LOGS)
    )
    try:
        peers = f"{node.address},{dead}"
        args = ("--no-mdns", "--peers", peers, "--http-listen", "127.0.0.1:0", *POLICY, *LOGS)
        gateway = start_process("mbt_aggregator.cli", signed_model.gateway_args(*args))
        ready_at = time.monotonic()
        try:
            with grpc.insecure_channel(gateway.address) as channel:
                stub = gw_grpc.GatewayServiceStub(channel)
                deadline = time.monotonic() + 20
                while not stub.Status(gw.StatusRequest(), timeout=5).nodes:
                    assert time.monotonic() < deadline, "the node was not admitted"
                    time.sleep(0.1)
            gateway_metrics = _url(gateway.ready_line, "metrics")
            node_metrics = _url(node.ready_line, "metrics")
            yield Site(
                node=node,
                gateway=gateway,
                node_id=node_id(node),
                dead_peer=dead,
                ready_at=ready_at,
                branches=signed_model.model.cfg.branches,
                gateway_metrics=gateway_metrics,
                node_metrics=node_metrics,
                web_view=_url(gateway.ready_line, "web view"),
                fresh_gateway=Scrape.of(gateway_metrics),
                fresh_node=Scrape.of(node_metrics),
            )
        finally:
            gateway.kill()
    finally:
        node.kill()


# --- every known failure has a series from the start ---------------------------------------


def test_a_fresh_gateway_exports_every_known_failure_series_at_zero(site: Site) -> None:
    """What an alert's ``increase()`` needs to see the first event: the series before it, at
    0. Before any request, right after the node's admission."""
    node = site.node_id[:16]
    zero = [series("mbt_nodes_rejected_total", reason=r) for r in REJECTION_REASONS]
    zero.remove(series("mbt_nodes_rejected_total", reason="unreachable"))  # the dead peer's
    zero += [series("mbt_requests_failed_total", reason=r) for r in FAILURE_REASONS]
    zero += [series("mbt_membership_events_total", event=e) for e in MEMBERSHIP_EVENTS]
    zero += [series("mbt_cache_replays_total", node=node)]
    zero += [series("mbt_replica_disagreements_total", node=node)]
    for layer, width in enumerate(site.branches):
        zero.append(series("mbt_quorum_failures_total", layer=str(layer)))
        for b in range(width):
            at = {"layer": str(layer), "branch": str(b)}
            zero += [series(f"mbt_{n}_total", **at) for n in ("hedged_calls", "clipped_outputs")]
            zero += [series("mbt_replica_audits_total", **at)]
            zero += [
                series("mbt_masked_branches_total", **at, reason=r) for r in (MASKED, REJECTED)
            ]
            zero += [
                series("mbt_rejected_outputs_total", **at, reason=r) for r in OUTPUT_REJECTIONS
            ]
            zero += [
                series("mbt_branch_calls_total", **at, node=node, outcome=o) for o in CALL_OUTCOMES
            ]
    gateway = site.fresh_gateway.samples
    assert {s: gateway.get(s) for s in zero if gateway.get(s) != 0} == {}
    discovered = [series("mbt_nodes_discovered_total", source=s) for s in DISCOVERY_SOURCES]
    assert all(s in gateway for s in discovered), discovered
    refusals = [
        series("mbt_node_refused_calls_total", reason=kind_name(kind), code=code.name)
        for kind, code in STATUS_OF.items()
    ]
    refusals += [series("mbt_node_refusals_total", limit=limit) for limit in LIMITS]
    refusals += [series("mbt_node_session_events_total", event=event) for event in EVENTS]
    nodes = site.fresh_node.samples
    assert {s: nodes.get(s) for s in refusals if nodes.get(s) != 0} == {}


# The alerts on failure counters, with the series that counts the first failure.
FIRST_EVENTS = {
    "MbtNodesRejected": series("mbt_nodes_rejected_total", reason="model"),
    "MbtQuorumFailures": series("mbt_quorum_failures_total", layer="1"),
    "MbtRequestsFailing": series("mbt_requests_failed_total", reason="quorum"),
}
STEP = 15  # seconds between the samples of the promtool test (a scrape interval)
BEFORE = 40  # samples before the first event (10 minutes)


def _promql(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def _minutes(duration: str | None) -> int:
    return 0 if duration is None else int(duration.removesuffix("m"))


def _first_event_tests(site: Site) -> list[dict[str, Any]]:
    """One promtool test per alert (and a control): every series of the fresh scrapes at its
    scraped value, the alert's series stepping by one after ``BEFORE`` samples; the alert must
    fire after its ``for``. The control starts the series at that first event instead (what a
    series born with its first event looks like): the same alert must stay silent."""
    rules = {r["alert"]: r for r in alert_rules()}
    scraped = {
        **{
            (n, (*ls, ("job", "mbt-aggregator"))): v
            for (n, ls), v in site.fresh_gateway.samples.items()
        },
        **{(n, (*ls, ("job", "mbt-node"))): v for (n, ls), v in site.fresh_node.samples.items()},
    }
    tests = []
    for alert, (name, labels) in FIRST_EVENTS.items():
        stepped = (name, (*labels, ("job", "mbt-aggregator")))
        assert scraped.get(stepped) == 0, f"{alert}: {stepped} is not in the fresh scrape at 0"
        rule = rules[alert]
        by = re.search(r"by \(([^)]*)\)", rule["expr"])
        assert by, rule["expr"]
        at = dict(labels)
        exp_labels = {k.strip(): at[k.strip()] for k in by.group(1).split(",")}
        exp_labels |= rule["labels"]
        eval_at = f"{BEFORE * STEP // 60 + _minutes(rule.get('for')) + 2}m"
        for born_at_first_event, expected in ((False, [{"exp_labels": exp_labels}]), (True, [])):
            values = {s: f"{v:g}x{2 * BEFORE}" for s, v in scraped.items()}
            first = "_" if born_at_first_event else "0"
            values[stepped] = f"{first}x{BEFORE - 1} 1x{BEFORE}"
            tests.append(
                {
                    "name": f"{alert}{' (born at its first event)' if born_at_first_event else ''}",
                    "interval": f"{STEP}s",
                    "input_series": [
                        {"series": _promql(n, dict(ls)), "values": v}
                        for (n, ls), v in sorted(values.items())
                    ],
                    "alert_rule_test": [
                        {"eval_time": eval_at, "alertname": alert, "exp_alerts": expected}
                    ],
                }
            )
    return tests


def test_alerts_on_failure_counters_fire_on_the_first_failure(site: Site, tmp_path: Path) -> None:
    """``promtool test rules`` on deploy's alert rules with the gateway's and the node's real
    series. The rules' annotations are left out of the copy tested: promtool compares them
    verbatim, and ``$value | humanize`` depends on Prometheus' range semantics (``promtool
    check rules`` checks their templates)."""
    (doc,) = yaml.safe_load_all(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(doc))
    cases = tmp_path / "first-event.yml"
    cases.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules.name],
                "evaluation_interval": "1m",
                "tests": _first_event_tests(site),
            }
        )
    )
    result = promtool("test", "rules", cases)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SUCCESS" in result.stdout


# --- standard services --------------------------------------------------------------------


def _service(site: Site, who: str) -> tuple[ManagedProcess, str]:
    if who == "gateway":
        return site.gateway, "mbt.v1.GatewayService"
    return site.node, "mbt.v1.BranchService"


def _no_traceback(process: ManagedProcess) -> None:
    time.sleep(0.5)  # what the server logs about a call is written as it ends
    output = process.all_output()
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("who", ["gateway", "node"])
def test_health_answers_list_check_and_watch_without_a_traceback(site: Site, who: str) -> None:
    process, service = _service(site, who)
    with grpc.insecure_channel(process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        listed = health.List(health_pb2.HealthListRequest(), timeout=5)
        statuses = {name: s.status for name, s in listed.statuses.items()}
        assert statuses == {"": SERVING, service: SERVING}
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert next(watch).status == SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    _no_traceback(process)


@pytest.mark.parametrize("who", ["gateway", "node"])
def test_a_reflection_v1_client_lists_and_describes_the_services(site: Site, who: str) -> None:
    process, service = _service(site, who)
    asked = [
        v1.ServerReflectionRequest(list_services=""),
        v1.ServerReflectionRequest(file_containing_symbol=service),
        v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    with grpc.insecure_channel(process.address) as channel:
        stub = v1_grpc.ServerReflectionStub(channel)
        listed, own, reflection = list(stub.ServerReflectionInfo(iter(asked), timeout=5))
    assert {s.name for s in listed.list_services_response.service} == {
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    for answer, name in ((own, service), (reflection, "grpc.reflection.v1.ServerReflection")):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        package, _, short = name.rpartition(".")
        assert any(f.package == package and short in {s.name for s in f.service} for f in files)
    _no_traceback(process)


# --- Status --------------------------------------------------------------------------------


def test_status_gives_the_policy_field_by_field(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    with grpc.insecure_channel(site.gateway.address) as channel:
        status = gw_grpc.GatewayServiceStub(channel).Status(gw.StatusRequest(), timeout=5)
    assert status.HasField("fanout_policy")
    p = status.fanout_policy
    assert (p.mode, p.deadline_ms, p.hedge, p.request_timeout_s, p.min_branches) == (
        "deadline",
        250.0,
        True,
        10.0,
        1,
    )
    assert not p.HasField("quorum_branches") and not p.HasField("quorum_weight")
    assert status.policy.startswith("deadline 250 ms, hedged, timeout 10 s"), status.policy
    assert main(["status", "--gateway", site.gateway.address, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["policy"]
    with urllib.request.urlopen(f"{site.web_view}mbt/swarm", timeout=5) as reply:
        shown = json.loads(reply.read())["policy"]  # what the web page renders
    assert printed == shown
    assert (printed["mode"], printed["deadline_ms"], printed["hedge"]) == ("deadline", 250, True)
    assert printed["quorum_branches"] is None and printed["summary"] == status.policy


# --- logs (last: waits for the dead peer's back-off) -----------------------------------------


def _records(process: ManagedProcess) -> list[dict[str, str]]:
    """Every line but the ready line (stdout, read by launchers) is one JSON log record."""
    lines = [ln for ln in process.all_output().splitlines() if ln and " ready: " not in ln]
    records = [json.loads(ln) for ln in lines]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records), records
    return records


def test_the_node_logs_json(site: Site) -> None:
    records = _records(site.node)
    assert any(r["message"].startswith("--insecure: plaintext gRPC") for r in records), records


def test_a_dead_static_peer_is_retried_with_back_off_and_logged_once(site: Site) -> None:
    """Once a second, forever, it used to be: 12 WARNING lines in 12 s. Now: one line when it
    goes down, then one a minute at most (tests/unit/aggregator/test_membership.py runs the
    minutes, scaled), and tries at 0, 1, 3, 7, 15 s... up to one every 30 s."""
    time.sleep(max(0.0, site.ready_at + WATCH_S - time.monotonic()))
    tries = Scrape.of(site.gateway_metrics).samples[
        series("mbt_nodes_rejected_total", reason="unreachable")
    ]
    assert 3 <= tries <= 5, f"{tries} tries in {WATCH_S:g} s"
    records = _records(site.gateway)
    about_peer = [r for r in records if site.dead_peer in r["message"]]
    assert [r["level"] for r in about_peer] == ["WARNING"], about_peer
    admitted = [r for r in records if r["message"].startswith("admitted node")]
    assert [r["level"] for r in admitted] == ["INFO"], admitted
    # WARNING and above: what an operator should look at, here the dead peer, plaintext, and
    # a model exported without calibrated bounds (the test's own); nothing routine.
    looked_at = [r["message"] for r in records if r["level"] not in ("DEBUG", "INFO")]
    expected = (site.dead_peer, "--insecure: plaintext", "no output-norm bound")
    assert all(any(e in m for e in expected) for m in looked_at), looked_at
    assert "Traceback" not in site.gateway.all_output()
