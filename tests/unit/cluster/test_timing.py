"""``interleaved``: benchmark figures taken in alternating rounds, warm-up dropped."""

from __future__ import annotations

import asyncio

import pytest

from mbt_core.cluster.timing import interleaved


def test_calls_alternate_in_rounds_and_the_warm_up_is_dropped() -> None:
    order: list[str] = []

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def call() -> None:
            order.append(name)
            await asyncio.sleep(0.002 if name == "slow" else 0)

        return call

    times = asyncio.run(interleaved({"fast": recorder("fast"), "slow": recorder("slow")}, 5, 2))
    assert order == (["fast"] * 2 + ["slow"] * 2) * 4  # warm-up round + 3 rounds of 2 (>= 5)
    assert [len(v) for v in times.values()] == [6, 6]
    assert min(times["slow"]) > max(times["fast"])


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(interleaved({}, 0))
