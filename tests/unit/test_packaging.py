"""What ``pip install .`` installs: the server's dependencies, not the benchmarks' or the tests'.

pip itself reads the project (its metadata, built from pyproject.toml as for a real install)
and reports what it would install; requirements without an extra marker are what every server
gets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def requirements(tmp_path: Path) -> list[Requirement]:
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    cmd += ["--quiet", "--report", str(report), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (project,) = json.loads(report.read_text())["install"]
    assert project["metadata"]["name"] == "mbt-runtime"
    return [Requirement(r) for r in project["metadata"]["requires_dist"]]


def installed(reqs: list[Requirement], extra: str = "") -> set[str]:
    """The names pip installs for ``pip install .`` (``extra``: ``.[extra]``), as it decides:
    each requirement's marker evaluated here, with ``extra`` set."""
    return {r.name.lower() for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})}


def test_a_server_install_pulls_no_plotting_and_the_bench_extra_does(tmp_path: Path) -> None:
    reqs = requirements(tmp_path)
    server = installed(reqs)
    assert {"torch", "grpcio", "prometheus-client"} <= server  # it is the server's list
    assert "matplotlib" not in server, "pip install . pulls matplotlib"
    assert installed(reqs, "bench") - server == {"matplotlib"}
    assert "matplotlib" in installed(reqs, "dev"), "the tests draw the plots: dev needs it"
