"""The README's main job (`mbt cluster`) and the gateway benchmark, as quick smoke runs.

No timing is asserted (the machines are noisy); the benchmark's figures must be consistent.
"""

import subprocess
import sys

import pytest

from mbt_aggregator.bench import main as bench_main
from mbt_aggregator.bench import run_bench
from mbt_core.cluster.local import Layout

pytestmark = [pytest.mark.integration]


def test_layout_spreads_branches_and_replicas() -> None:
    served = Layout(nodes=3, replicas=2).assign((2, 3))
    flat = [pair for node in served for pair in node]
    assert sorted(set(flat)) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert all(flat.count(pair) == 2 for pair in set(flat))
    assert all(len(set(node)) == len(node) for node in served)  # never twice on one node
    with pytest.raises(ValueError):
        Layout(nodes=2, replicas=3)


def test_mbt_cluster_generates_and_reports_every_branch() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbt_core.cli",
            "cluster",
            "ROMEO:",
            "--max-new-tokens",
            "8",
            "--greedy",
            "--kill-node-after",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if line.strip() and line.split()[0].isdigit() and len(line.split()) == 7
    ]
    assert len(rows) == 16  # 4 layers x 4 branches
    killed = [r for r in rows if r[2] == "node0"]  # node0 served branch 0 of every layer
    assert len(killed) == 4
    # Used for 4 tokens, then masked; the gateway may already be computing token 5 when the
    # kill lands (the client reads behind it), so that one may still have used node0.
    assert all(int(r[3]) in (4, 5) and int(r[3]) + int(r[4]) == 8 for r in killed), killed
    assert all(int(r[3]) == 8 for r in rows if r[2] != "node0")
    assert "[killed node0 after 4 tokens]" in result.stderr


def test_gateway_benchmark_smoke() -> None:
    r = run_bench(
        iters=5,
        tokens=4,
        concurrency=2,
        rows=(1, 3),
        wire_dtypes=("float32", "bfloat16", "float16"),
    )
    for key in (
        "layer_step_ms",
        "echo_fanout_ms",
        "branch_compute_ms",
        "token_ms_distributed",
        "token_ms_in_process",
        "tokens_per_s_1",
        "tokens_per_s_2",
    ):
        assert r[key] > 0, key
    assert [f["rows"] for f in r["fanouts"]] == [1, 3] and r["rows"] == 1
    for f in r["fanouts"]:
        assert f["d_model"] == 256 and f["layer_step_ms"] > 0
        assert f["fanout_ratio"] == pytest.approx(
            f["layer_step_ms"] / (f["echo_fanout_ms"] + f["branch_compute_ms"])
        )
    assert r["fanout_ratio"] == r["fanouts"][0]["fanout_ratio"]
    assert r["throughput_ratio"] == pytest.approx(r["tokens_per_s_2"] / r["tokens_per_s_1"])
    wire = {w["dtype"]: w for w in r["wire"]}
    assert wire["float32"]["greedy_equal"] and wire["float32"]["kl_vs_float32"] < 1e-6
    for half in ("bfloat16", "float16"):  # half the bytes each way, a small divergence
        for way in ("sent", "received"):
            ratio = (
                wire[half][f"{way}_bytes_per_layer_step"]
                / wire["float32"][f"{way}_bytes_per_layer_step"]
            )
            assert 0.4 < ratio < 0.75, (half, way, ratio)
        assert 0 < wire[half]["kl_vs_float32"] < 0.05, half


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "1,x"], "expected counts like 1,16"),
        (["--rows", "0"], "row counts must be positive"),
        (["--d-model", "130"], "--d-model must be a positive multiple of 16"),
        (["--d-model", "64", "--checkpoint", "m.safetensors"], "not both"),
        (["--wire-dtypes", "float32,int8"], "expected dtypes from float32"),
    ],
)
def test_gateway_benchmark_refuses_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
