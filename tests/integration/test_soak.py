"""The churn soak (``mbt-bench soak``): a 60-s run in CI, the full 10 minutes marked slow.

Each run starts a real TLS cluster (4 node processes, 2 replicas per branch, a gateway) and
kills, restarts, pauses and resumes nodes at random under 4 clients' load; its exit code says
whether every target held, and the report says what was measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mbt_aggregator.outage.cli", "soak", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


def _soak(out: Path, *args: str, timeout_s: float) -> dict:
    done = _run("--out", str(out), *args, timeout_s=timeout_s)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets: met" in done.stdout
    report = json.loads((out / "soak.json").read_text())
    assert report["missed"] == []
    return report


def _check(report: dict, min_faults: int) -> None:
    requests = report["requests"]
    assert requests["sent"] == requests["completed"] > 0
    assert requests["failed"] == 0 and requests["mismatches"] == 0
    assert report["sessions_left"] == 0
    assert len(report["faults"]) >= min_faults
    assert {f["action"] for f in report["faults"]} == {"kill", "pause"}
    assert set(report["rss_mib"]) == {"gateway", "node0", "node1", "node2", "node3"}


def test_soak_for_a_minute(tmp_path: Path) -> None:
    _check(_soak(tmp_path, "--duration-s", "60", timeout_s=400), min_faults=3)


@pytest.mark.slow
def test_soak_for_ten_minutes(tmp_path: Path) -> None:
    _check(_soak(tmp_path, timeout_s=1200), min_faults=40)


def test_soak_refuses_a_layout_without_a_spare_replica(tmp_path: Path) -> None:
    done = _run("--replicas", "1", "--out", str(tmp_path), timeout_s=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "mbt-bench soak: error: the soak needs at least 2 replicas per branch (--replicas)"
    )
