"""Smoke run of the node benchmark (a few calls); the full run is marked slow.

No timing is asserted: the machines are shared and noisy. The test checks that the benchmark
runs real processes end to end and reports self-consistent figures.
"""

import pytest

from mbt_node.bench import run_bench

pytestmark = pytest.mark.integration


def _check(r: dict[str, float]) -> None:
    for key in ("forward_1_ms", "echo_1_ms", "compute_1_ms", "forward_n_ms"):
        assert r[key] > 0.0, key
    assert r["overhead_ratio"] == pytest.approx(
        r["forward_1_ms"] / (r["echo_1_ms"] + r["compute_1_ms"])
    )
    assert r["batch_ratio"] == pytest.approx(r["forward_n_ms"] / r["forward_1_ms"])


def test_node_bench_smoke() -> None:
    r = run_bench(d_model=64, iters=10, sessions=4)
    assert (r["d_model"], r["sessions"], r["iters"]) == (64, 4, 10)
    _check(r)


@pytest.mark.slow
def test_node_bench_full() -> None:
    r = run_bench()
    _check(r)
    print(r)
