"""``mbt-bench outage``: the quick run end to end, the Byzantine node, CLI errors, and (slow,
root only) the network-namespace mode with its cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mbt_aggregator.outage import cli
from mbt_aggregator.outage.runner import wait_healthy
from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.model.checkpoint import load_checkpoint
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.wire.codec import decode, encode
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_node.faults import ENABLE_ENV
from tests.integration.conftest import SignedModel

pytestmark = pytest.mark.integration
SECRET = b"test-session-secret"  # binds the tests' sessions to their opener
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIELDS = (
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "tokens_per_s",
    "requests_sent",
    "requests_completed",
    "tokens_lost",
    "perplexity",
    "kl",
    "lost_fraction",
    "time_to_mask_s",
    "time_to_recover_s",
    "greedy_match",
)


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbt_aggregator.outage.cli", "outage", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("outage")
    result = _bench("--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out, result.stdout


def test_quick_run_reports_every_scenario_and_policy(quick: tuple[dict, Path, str]) -> None:
    report, _, stdout = quick
    runs = {(r["scenario"], r["policy"]): r for r in report["runs"]}
    assert set(runs) == {(s, p) for s in cli.QUICK_SCENARIOS for p in cli.QUICK_POLICIES}
    for (scenario, policy), r in runs.items():
        for key in FIELDS:
            assert key in r, key
        assert r["requests_sent"] >= r["requests_completed"] > 0
        assert r["tokens_per_s"] > 0 and r["tokens_lost"] >= 0
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"] <= r["latency_p99_ms"]
        assert r["perplexity"] > 1 and r["kl"] >= -1e-9, (scenario, policy, r["score_error"])
        assert any(line.split()[:2] == [scenario, policy] for line in stdout.splitlines())
    base = report["baseline"]
    assert base["tokens_per_s"] > 0 and base["perplexity"] > 1
    assert "baseline" in stdout and "in-process" in stdout


def test_healthy_run_equals_the_in_process_model(quick: tuple[dict, Path, str]) -> None:
    report, _, _ = quick
    healthy = next(r for r in report["runs"] if r["scenario"] == "healthy" and r["policy"] == "all")
    assert healthy["kl"] < 1e-6
    assert healthy["perplexity"] == pytest.approx(report["baseline"]["perplexity"], rel=1e-4)
    assert healthy["greedy_match"] == 1.0
    assert healthy["requests_completed"] == healthy["requests_sent"]
    assert healthy["tokens_lost"] == 0 and healthy["lost_fraction"] == 0
    assert healthy["time_to_mask_s"] is None and healthy["episodes"] == []
    # The baseline itself is the shipped model's greedy output, computed here independently.
    ckpt = load_checkpoint(None)
    workload = report["config"]["workload"]
    cfg = SamplingConfig(max_new_tokens=workload["max_new_tokens"], temperature=0.0)
    prompt = ckpt.tokenizer.encode(workload["prompts"][0])
    assert [t for t, _ in generate(ckpt.model, prompt, cfg)] == report["baseline"]["outputs"][0]


def test_crash_masks_the_node_then_recovers(quick: tuple[dict, Path, str]) -> None:
    report, _, _ = quick
    for policy in cli.QUICK_POLICIES:
        crash = next(
            r for r in report["runs"] if r["scenario"] == "crash" and r["policy"] == policy
        )
        (episode,) = crash["episodes"]
        assert episode["action"] == "kill" and episode["node"] == 0
        assert episode["time_to_mask_s"] is not None and episode["time_to_mask_s"] > 0
        assert crash["time_to_mask_s"] == episode["time_to_mask_s"]
        assert episode["recovered_s"] > episode["injected_s"]
        kinds = [m["kind"] for m in crash["markers"]]
        assert kinds == ["fault", "recover"]
        # Half the branches (node 0 of 2) were gone while the text was scored.
        assert crash["lost_fraction"] > 0.2 and crash["kl"] > 1e-3
        assert any(w > 0 for _, _, w in crash["series"])


def test_sweep_and_plots(quick: tuple[dict, Path, str]) -> None:
    report, out, _ = quick
    sweep = report["sweep"]
    assert [s["nodes_killed"] for s in sweep] == [0, 1]
    assert sweep[0]["kl"] < 1e-6 and sweep[0]["lost_fraction"] == 0
    assert sweep[1]["lost_fraction"] == pytest.approx(0.5) and sweep[1]["kl"] > 1e-3
    for name in ("latency.png", "quality.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_byzantine_node_corrupts_forward_outputs(
    signed_model: SignedModel, node_factory, stub_for, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = node_factory(signed_model.node_args("0:0", "--no-advertise"))
    monkeypatch.setenv(ENABLE_ENV, "1")
    liar = node_factory(
        signed_model.node_args("0:0", "--no-advertise", "--unsafe-test-fault", "corrupt=flip")
    )
    torch.manual_seed(3)
    x = torch.randn(4, 32)
    request = pb.ForwardRequest(
        layer=0,
        branches=[0],
        inputs=encode(x),
        steps=[pb.SessionStep(session_id="s", start=0, length=4, secret=SECRET)],
    )
    good = decode(stub_for(honest).Forward(request, timeout=10).outputs[0].outputs)
    bad = decode(stub_for(liar).Forward(request, timeout=10).outputs[0].outputs)
    torch.testing.assert_close(bad, -good)
    assert "TEST FAULT ACTIVE" in liar.all_output()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _reaches(pid: int, stopped: bool, timeout_s: float = 5.0) -> bool:
    """Signals are delivered asynchronously: poll until the process is (not) stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (_state(pid) == "T") == stopped:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.mdns
def test_local_cluster_controls_each_node() -> None:
    with LocalCluster(None, Layout(1, 1), node_extra=[("--delay-ms", "1")]) as cluster:
        first_id, first_address = cluster.node_ids[0], cluster.nodes[0].address
        cluster.pause_node(0)
        assert _reaches(cluster.nodes[0].pid, stopped=True)
        cluster.resume_node(0)
        assert _reaches(cluster.nodes[0].pid, stopped=False) and cluster.node_running(0)
        # A fresh port: the gateway's static peer list does not know it, mDNS announces it.
        # It keeps its certificate (mutual TLS by default), so its id: the gateway sees the
        # id move away from an address that no longer answers, and follows it.
        node = cluster.restart_node(0, same_port=False)
        assert node.address != first_address and cluster.node_ids[0] == first_id
        assert cluster.node_extra[0] == ("--delay-ms", "1")  # kept across the restart
        wait_healthy(cluster, replicas=1, timeout_s=30)
        cluster.restart_node(0, extra_args=(), same_port=True)
        assert cluster.nodes[0].address == node.address and cluster.node_extra[0] == ()
        wait_healthy(cluster, replicas=1, timeout_s=30)
        old_gateway = cluster.address
        cluster.restart_gateway(("--policy", "deadline"))
        assert cluster.address != old_gateway and "deadline" in cluster.status().policy
        cluster.kill_node(0)
        assert not cluster.node_running(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "nope"], "no scenario 'nope'"),
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--scenario", "partition"], "needs --netns"),
        (["--duration-s", "1", "--scenario", "crash"], "past the workload's duration"),
    ],
)
def test_cli_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["outage", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mbt-bench outage: error:") and message in err
    assert len(err.splitlines()) == 1


def test_list_shows_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["outage", "--list"]) == 0
    out = capsys.readouterr().out
    assert {line.split()[0] for line in out.splitlines()} >= {"healthy", "crash", "partition"}


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="--netns needs root and iproute2",
)
def test_netns_partition_and_cleanup(tmp_path: Path) -> None:
    from mbt_aggregator.outage.netns import NetnsLab, links, namespaces, remove_stale

    # A lab left behind by a crashed run (its owner pid is gone) is removed at the next start.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = NetnsLab(1, tag=f"mbto{dead.pid}")
    stale._setup()
    assert stale.namespace(0) in namespaces()
    assert stale.namespace(0) in remove_stale() and stale.namespace(0) not in namespaces()
    assert stale.bridge not in links()

    out = tmp_path / "netns"
    result = _bench(
        "--quick", "--netns", "--scenario", "partition", "--scenario", "slow-link",
        "--policy", "all", "--no-sweep", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    partition = next(r for r in report["runs"] if r["scenario"] == "partition")
    (episode,) = partition["episodes"]
    assert episode["time_to_mask_s"] is not None and episode["time_to_mask_s"] > 0
    assert report["config"]["netns"] is True
    assert not [n for n in namespaces() if n.startswith("mbto")]
    assert not [link for link in links() if link.startswith("mbto")]

    # Ctrl-C in the middle of a run: exit 130, every namespace, link and process gone.
    args = ["--quick", "--netns", "--scenario", "crash", "--policy", "all", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbt_aggregator.outage.cli", "outage", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not _lab_of(proc.pid, namespaces()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(12)  # into the cluster's start or the run
    children = _children(proc.pid)
    assert children  # the nodes (and the gateway) run
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not _lab_of(proc.pid, namespaces()) and not _lab_of(proc.pid, links())
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def _lab_of(pid: int, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(f"mbto{pid}")]


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.mdns  # the new node is found over mDNS, as a node joining a swarm is
def test_expand_scenario_ramps_the_new_branches_in_under_load(tmp_path: Path) -> None:
    out = tmp_path / "expand"
    result = _bench(
        "--quick",
        "--scenario",
        "expand",
        "--policy",
        "all",
        "--no-sweep",
        "--no-plots",
        "--duration-s",
        "10",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    ramp = run["ramp"]
    states = [s["state"] for s in ramp]
    assert states[0] == "none" and states[-1] == "complete", states
    betas = [s["beta"] for s in ramp]
    assert betas == sorted(betas) and betas[-1] == 1.0
    assert any(0 < b < 1 for b in betas), "the ramp went through intermediate rates"
    assert ramp[-1]["drift_kl"] > 0 and ramp[-1]["probe_perplexity"] > 1
    assert run["requests_completed"] == run["requests_sent"] > 0
    assert "ramp of expand / all" in result.stdout and "complete" in result.stdout
