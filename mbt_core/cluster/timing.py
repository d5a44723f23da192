"""Benchmark timing shared by the node and gateway benches: ratios from one run.

The machines are shared, and their speed drifts by tens of percent within a minute. Timing one
figure after another would let that drift into the ratios; timing them in alternating short
rounds makes it weigh on every figure alike.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import torch

from mbt_core.model.blocks import Branch
from mbt_core.model.kv import KVSlots

Timed = Callable[[], Awaitable[object]]


def branch_step(branch: Branch, prefix: int, sessions: int = 1) -> Timed:
    """One decode step of ``branch`` for ``sessions`` sessions at once in this process, each
    after ``prefix`` cached positions and rolled back each time: the compute a node must do
    for a one-token step of that many sessions (their caches in one slot pool, as a node keeps
    them)."""
    d = branch.cfg.d_model
    pool = KVSlots(branch.cfg, torch.float32, "cpu", branch.kv_heads())
    caches = [pool.new_cache() for _ in range(sessions)]
    x = torch.randn(sessions, d)
    with torch.inference_mode():
        for cache in caches:
            branch.forward_ragged(torch.randn(prefix, d), [cache], [prefix])

    async def step() -> None:
        with torch.inference_mode():
            for cache in caches:
                cache.truncate(prefix)
            branch.forward_ragged(x, caches, [1] * sessions)

    return step


async def interleaved(
    calls: Mapping[str, Timed], iters: int, round_size: int = 10
) -> dict[str, list[float]]:
    """Seconds of ``iters`` (rounded up to whole rounds) calls of each of ``calls``, taken in
    turns of ``round_size``; one first round of each warms up and is not counted."""
    if iters <= 0 or round_size <= 0:
        raise ValueError("iters and round_size must be positive")
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds = -(-iters // round_size)
    for r in range(rounds + 1):
        for name, call in calls.items():
            for _ in range(round_size):
                t0 = time.perf_counter()
                await call()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return times
