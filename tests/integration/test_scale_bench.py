"""``mbt-scale-bench``, shrunk to seconds: the figures it reports are measured, not assumed.

(The full-size run, a 1.2B-parameter bfloat16 model on 4 nodes, is the ``slow`` test below and
the README's figures.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mbt_aggregator.scale_bench import main

pytestmark = pytest.mark.integration
TINY = [
    "--d-model", "64", "--blocks", "2", "--heads", "4", "--kv-heads", "4",
    "--intermediate", "128", "--vocab", "2048", "--branches", "4", "--nodes", "4",
    "--tokens", "4", "--context", "128",
]  # fmt: skip


def _run(tmp_path: Path, args: list[str]) -> dict:
    out = tmp_path / "scale.json"
    assert main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_scale_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _run(tmp_path, TINY)
    assert r["greedy_equal"] is True  # bfloat16 through 4 nodes, exactly the in-process tokens
    assert r["nodes"] == 4 and len(r["node_peak_rss_mib"]) == 4
    shares = [mib / r["branch_mib_total"] for mib in r["node_branch_mib"]]
    assert all(abs(s - 0.25) < 0.01 for s in shares)  # node b holds branch b of every layer
    assert all(rss > 50 for rss in [*r["node_peak_rss_mib"], r["gateway_peak_rss_mib"]])
    # A layer step sends one position of d_model bfloat16 values plus framing, at least.
    assert r["sent_bytes_per_layer_step"] >= 64 * 2
    assert r["received_bytes_per_layer_step"] >= 64 * 2
    assert math.isfinite(r["token_latency_ratio"]) and r["token_latency_ratio"] > 0
    assert r["start_to_first_token_s"] >= r["start_to_complete_s"] > 0
    assert "per token, distributed" in capsys.readouterr().out


def test_scale_bench_refuses_a_shape_it_cannot_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--kv-heads", "2"]) == 2  # 4 branches, 2 key-value groups
    assert "do not divide the 2 key-value head groups" in capsys.readouterr().err


@pytest.mark.slow
def test_scale_bench_full_size(tmp_path: Path) -> None:
    r = _run(tmp_path, [])
    assert r["greedy_equal"] is True
    assert r["parameters"] > 1e9
