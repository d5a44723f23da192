"""Watching a live local cluster: a real Prometheus scrapes the gateway and the nodes, and every
PromQL expression of the dashboard and the alerts returns data; ``mbt status`` shows the swarm.

One cluster of the tiny model (two nodes with ``--metrics-port 0``, a gateway, mutual TLS) for
the module. Prometheus (Debian's ``prometheus`` package; ``.ci/run`` installs it) scrapes every
second and evaluates the alert rules every second.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import yaml

from mbt_core.cli.main import main
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.model.checkpoint import save_checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.sampling import SamplingConfig
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.wire.gateway_client import GatewayClient
from tests.tools import external_tool
from tests.unit.test_deploy import ALERTS, alert_rules, dashboard_exprs

pytestmark = [pytest.mark.integration]
# A comparison with a number at the end of an alert's expression: what makes it a condition.
CONDITION = re.compile(r"^(?P<inner>.*?)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.DOTALL)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig, tiny_tokenizer: Tokenizer
) -> Iterator[LocalCluster]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("observed") / "tiny.safetensors"
    save_checkpoint(path, MBTLanguageModel(tiny_config).eval(), tiny_tokenizer, {})
    layout = Layout(nodes=2)
    # Static peers only: a gateway browsing mDNS would also see (and, rightly, reject and count)
    # the nodes of other clusters on this host, which MbtNodesRejected alerts on.
    node_args = ("--metrics-port", "0", "--no-advertise")
    with LocalCluster(path, layout, node_args=node_args, gateway_args=("--no-mdns",)) as c:
        yield c


def _generate(cluster: LocalCluster, tokens: int) -> int:
    client = GatewayClient(cluster.address, cluster.credentials, timeout_s=30)
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0.0)
    return sum(1 for _ in client.generate("Shall I", cfg))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])


@pytest.fixture(scope="module")
def prometheus(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    prometheus_bin = external_tool("prometheus", "Debian's prometheus package; .ci/run installs it")
    root = tmp_path_factory.mktemp("prometheus")
    nodes = cluster.node_metrics_urls
    assert len(nodes) == len(cluster.nodes)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "mbt-aggregator",
                "static_configs": [{"targets": [host(cluster.metrics_url)]}],
            },
            {"job_name": "mbt-node", "static_configs": [{"targets": [host(u) for u in nodes]}]},
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    log = (root / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        prom = Prometheus(f"http://{address}")
        _until(lambda: len(prom.query("up == 1")) == 1 + len(nodes), "every target is up")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def host(url: str) -> str:
    """``http://HOST:PORT/metrics`` -> ``HOST:PORT``."""
    return url.split("/")[2]


def _until(ready: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.25)


def _tokens(prometheus: Prometheus) -> float:
    found = prometheus.query("max(mbt_tokens_generated_total)")
    return float(found[0]["value"][1]) if found else 0.0


def _promql(expr: str) -> str:
    """Grafana's interval variable as Prometheus reads it (scrapes are 1 s apart)."""
    return expr.replace("$__rate_interval", "30s")


def test_every_dashboard_and_alert_expression_returns_live_data(
    cluster: LocalCluster, prometheus: Prometheus
) -> None:
    # Two rounds, each until Prometheus has scraped it: a series born in the first round (a
    # labelled one appears with its first value) increases in the second, so rates are live.
    for _ in range(2):
        target = _tokens(prometheus) + _generate(cluster, 12)
        _until(lambda t=target: _tokens(prometheus) >= t, "the tokens are scraped")
    time.sleep(1.5)  # every target scraped once more since
    # Every panel has a number, not only NaN from an empty rate (live traffic in its window).
    blank = [
        expr
        for expr in dashboard_exprs()
        if not any(not math.isnan(float(r["value"][1])) for r in prometheus.query(_promql(expr)))
    ]
    assert not blank, f"dashboard expressions without data: {blank}"
    empty = []
    for rule in alert_rules():
        expr = rule["expr"]
        if prometheus.query(expr):
            continue
        # Not firing: the expression must be a condition whose inner series exist.
        condition = CONDITION.match(expr)
        assert condition, f"alert {rule['alert']}: no data and no condition: {expr}"
        assert prometheus.query(condition["inner"]), f"alert {rule['alert']}: no series: {expr}"
        empty.append(rule["alert"])
    # A healthy cluster fires nothing (MbtWidthCollapsed: the tiny model's alpha is uniform).
    assert len(empty) == len(alert_rules()), "some alert fires on a healthy cluster"
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules.values()), rules


def _status(cluster: LocalCluster, *extra: str) -> list[str]:
    tls = cluster.credentials.tls
    flags = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
    return ["status", "--gateway", cluster.address, *flags, *extra]


def test_mbt_status_shows_nodes_branches_replicas_and_recent_outcomes(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _generate(cluster, 4) > 0
    assert main(_status(cluster, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert {n["node_id"] for n in data["nodes"]} == set(cluster.node_ids)
    assert all(n["healthy"] for n in data["nodes"])
    layers = data["layers"]
    assert [len(layer["branches"]) for layer in layers] == [2, 3]  # the tiny model: (2, 3)
    for layer in layers:
        for b in layer["branches"]:
            key = f"{layer['layer']}:{b['branch']}"
            (owner,) = [
                i for i, s in enumerate(cluster.served) if tuple(map(int, key.split(":"))) in s
            ]
            assert b["nodes"] == [cluster.node_ids[owner]] and b["live_replicas"] == 1
            assert b["recent"]["last"] == "ok" and b["recent"]["ok"] >= 4
            assert b["recent"]["masked"] == b["recent"]["rejected"] == 0

    cluster.kill_node(1)
    assert _generate(cluster, 4) == 4  # the text keeps coming, node 1's branches masked
    assert main(_status(cluster)) == 0
    table = capsys.readouterr().out
    down = next(line for line in table.splitlines() if line.startswith(cluster.node_ids[1][:16]))
    assert " down " in down
    rows = [line.split() for line in table.splitlines() if re.match(r"\d+\s+\d+\s+0\.\d+", line)]
    assert len(rows) == 5
    masked = {(int(r[0]), int(r[1])) for r in rows if r[-1] == "masked"}
    assert masked == set(cluster.served[1])


def test_mbt_status_of_an_unreachable_gateway_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["status", "--gateway", f"127.0.0.1:{_free_port()}", "--timeout-s", "5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mbt status: error: ") and err.count("\n") == 1, err


def _alerts(prometheus: Prometheus) -> dict[str, str]:
    """Alert name -> its state now (pending, firing); absent ones are inactive."""
    return {
        a["labels"]["alertname"]: a["state"] for a in prometheus.get("/api/v1/alerts")["alerts"]
    }


@pytest.mark.slow
def test_alerts_fire_on_a_hung_node_and_resolve_on_its_return(
    cluster: LocalCluster, prometheus: Prometheus
) -> None:
    """The long version (``pytest -m slow``): a minute and more of steady traffic, a node hung
    under it (SIGSTOP: it answers nothing, its metrics neither) until the alerts about it fire
    (after their ``for``), then resumed on the same ports until they resolve; every dashboard
    expression has data under traffic. (A SIGKILLed node restarted with ``--metrics-port 0``
    would come back on another port, where the static scrape target does not look.)"""
    for i in range(len(cluster.nodes)):  # killed by an earlier test: back on its scraped port
        if not cluster.node_running(i):
            port = cluster.node_metrics_urls[i].split(":")[-1].split("/")[0]
            cluster.restart_node(i, ("--metrics-port", port))
    cluster.wait_until_complete()
    stop, generated = threading.Event(), [0]

    def traffic() -> None:
        while not stop.is_set():
            generated[0] += _generate(cluster, 8)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        time.sleep(35)  # rate windows of 30 s fill with live traffic
        blank = [
            expr
            for expr in dashboard_exprs()
            if all(math.isnan(float(r["value"][1])) for r in prometheus.query(_promql(expr)))
        ]
        assert not blank, f"dashboard expressions without data under traffic: {blank}"
        _until(lambda: not _alerts(prometheus), "no alert on the healthy cluster", 30)

        cluster.pause_node(0)
        expected = {"MbtBranchWithoutReplica", "MbtNodeMetricsDown"}  # both `for: 1m`
        _until(
            lambda: {n for n, s in _alerts(prometheus).items() if s == "firing"} >= expected,
            f"{expected} fire",
            timeout_s=120,
        )
        assert "MbtGatewayDown" not in _alerts(prometheus)
        before = generated[0]
        _until(lambda: generated[0] > before, "the text keeps coming without node 0")

        cluster.resume_node(0)
        cluster.wait_until_complete(timeout_s=60)
        _until(lambda: not expected & set(_alerts(prometheus)), f"{expected} resolve", 60)
    finally:
        if cluster.node_running(0):
            cluster.resume_node(0)  # a stopped process would hold the module's teardown
        stop.set()
        worker.join(60)
