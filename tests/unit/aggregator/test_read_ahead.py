"""``read_ahead``: the gateway computes a generation's next token while it sends the last."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mbt_aggregator.generation import read_ahead


class Source:
    """Counts 0.. up to ``n`` (then fails with ``error``, if given), noting what it did."""

    def __init__(self, n: int, error: Exception | None = None) -> None:
        self.n, self.error = n, error
        self.made: list[int] = []
        self.closed = False

    async def items(self) -> AsyncIterator[int]:
        try:
            for i in range(self.n):
                await asyncio.sleep(0)
                self.made.append(i)
                yield i
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


def test_items_arrive_in_order_and_the_source_runs_ahead() -> None:
    source = Source(10)

    async def main() -> list[int]:
        got = []
        async for item in read_ahead(source.items(), depth=3):
            got.append(item)
            if item == 0:
                await asyncio.sleep(0.05)  # a slow consumer: the source goes on meanwhile
                assert len(source.made) >= 4  # one taken, three queued, one waiting to go in
        return got

    assert asyncio.run(main()) == list(range(10))
    assert source.closed


def test_the_source_error_comes_after_its_items() -> None:
    source = Source(3, ValueError("no quorum"))

    async def main() -> list[int]:
        got = []
        with pytest.raises(ValueError, match="no quorum"):
            async for item in read_ahead(source.items(), depth=8):
                got.append(item)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_consumer_that_stops_cancels_the_source() -> None:
    source = Source(1000)

    async def main() -> None:
        stream = read_ahead(source.items(), depth=2)
        async for item in stream:
            if item == 5:
                break
        await stream.aclose()
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert source.closed and len(source.made) < 20
