"""The fan-out policy, driven by fake calls that sleep, fail or wait on an event.

Timings are loose on purpose (a loaded 2-core CI machine): a "slow" call takes seconds while
the policy's timers are tens of milliseconds, and only upper bounds far below the slow delay,
or lower bounds (which load can only make later), are asserted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from mbt_aggregator import Collected, FanoutPolicy, collect

SLOW_S = 2.0  # a straggler: never awaited to the end
LATE_S = 1.0  # a straggler whose completion the test awaits
FAST_S = 0.01


class Calls:
    """Fake calls that record when they started and how they ended."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.finished: dict[str, str] = {}  # name -> "ok" | "error" | "cancelled"

    def make(
        self, name: str, delay_s: float, exc: BaseException | None = None
    ) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            self.started[name] = asyncio.get_running_loop().time()
            try:
                await asyncio.sleep(delay_s)
            except asyncio.CancelledError:
                self.finished[name] = "cancelled"
                raise
            if exc is not None:
                self.finished[name] = "error"
                raise exc
            self.finished[name] = "ok"
            return name

        return call


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def _drain(got: Collected[str, str]) -> list[str]:
    return await asyncio.gather(*got.late_calls())


def test_all_waits_for_everyone_and_returns_when_done() -> None:
    calls = Calls()
    primary = {k: calls.make(k, d) for k, d in (("a", FAST_S), ("b", 0.03), ("c", 0.06))}
    got = run(collect(primary, FanoutPolicy(request_timeout_s=10.0)))
    assert got.results == {"a": "a", "b": "b", "c": "c"}
    assert got.stopped_by == "complete"
    assert got.elapsed_s >= 0.05  # waited for the slowest
    assert got.elapsed_s < 5.0  # but not for the timeout
    assert not got.late and not got.errors and not got.missing() and got.enough


def test_all_with_a_failing_branch() -> None:
    calls = Calls()

    def broken_factory() -> Awaitable[str]:
        raise ConnectionError("no route")

    primary = {
        "a": calls.make("a", FAST_S),
        "b": calls.make("b", FAST_S, RuntimeError("boom")),
        "c": broken_factory,
    }
    got = run(collect(primary, FanoutPolicy(request_timeout_s=10.0, min_branches=2)))
    assert got.results == {"a": "a"}
    assert isinstance(got.errors["b"], RuntimeError)
    assert isinstance(got.errors["c"], ConnectionError)
    assert got.missing() == {"b", "c"}
    assert got.stopped_by == "complete" and got.elapsed_s < 5.0
    assert not got.enough  # one success, two needed: the caller fails the request


def test_all_is_bounded_by_the_request_timeout_and_leaves_stragglers_running() -> None:
    calls = Calls()

    async def scenario() -> tuple[Collected[str, str], list[str]]:
        primary = {"a": calls.make("a", FAST_S), "b": calls.make("b", LATE_S)}
        got = await collect(primary, FanoutPolicy(request_timeout_s=0.05))
        assert calls.finished == {"a": "ok"}  # b still running when collect returned
        return got, await _drain(got)

    got, drained = run(scenario())
    assert got.results == {"a": "a"} and got.missing() == {"b"}
    assert got.stopped_by == "timeout" and got.elapsed_s < LATE_S / 2
    assert list(got.late) == ["b"] and drained == ["b"]
    assert calls.finished["b"] == "ok"  # completed, not cancelled


def test_quorum_by_count_then_grace_takes_a_close_one_but_not_a_slow_one() -> None:
    calls = Calls()
    delays = {"a": FAST_S, "b": FAST_S, "c": 0.04, "d": SLOW_S}
    primary = {k: calls.make(k, d) for k, d in delays.items()}
    policy = FanoutPolicy(mode="quorum", quorum_branches=2, grace_ms=300.0)
    got = run(collect(primary, policy))
    assert set(got.results) == {"a", "b", "c"}
    assert set(got.late) == {"d"} and got.missing() == {"d"}
    assert got.stopped_by == "quorum" and got.elapsed_s < SLOW_S / 2


def test_quorum_by_weight_fraction() -> None:
    calls = Calls()
    delays = {"a": FAST_S, "b": 0.08, "c": SLOW_S}
    primary = {k: calls.make(k, d) for k, d in delays.items()}
    policy = FanoutPolicy(mode="quorum", quorum_weight=0.75, grace_ms=0.0)
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}  # a alone is 50%: b is needed, c is not
    got = run(collect(primary, policy, weights=weights))
    assert set(got.results) == {"a", "b"}
    assert got.stopped_by == "quorum" and got.elapsed_s < SLOW_S / 2


def test_quorum_also_waits_for_min_branches() -> None:
    calls = Calls()
    delays = {"a": FAST_S, "b": 0.08, "c": SLOW_S}
    primary = {k: calls.make(k, d) for k, d in delays.items()}
    policy = FanoutPolicy(mode="quorum", quorum_weight=0.5, grace_ms=0.0, min_branches=2)
    got = run(collect(primary, policy, weights={"a": 9.0, "b": 0.5, "c": 0.5}))
    assert set(got.results) == {"a", "b"} and got.enough


def test_quorum_beyond_the_branch_count_means_all() -> None:
    calls = Calls()
    primary = {k: calls.make(k, d) for k, d in (("a", FAST_S), ("b", 0.05))}
    policy = FanoutPolicy(mode="quorum", quorum_branches=3, grace_ms=0.0)
    got = run(collect(primary, policy))
    assert set(got.results) == {"a", "b"} and got.stopped_by == "complete"


def test_deadline_takes_the_fast_ones_and_leaves_the_slow_one_running() -> None:
    calls = Calls()

    async def scenario() -> tuple[Collected[str, str], list[str]]:
        delays = {"a": FAST_S, "b": FAST_S, "c": LATE_S}
        primary = {k: calls.make(k, d) for k, d in delays.items()}
        got = await collect(primary, FanoutPolicy(mode="deadline", deadline_ms=200.0))
        assert "c" not in calls.finished
        return got, await _drain(got)

    got, drained = run(scenario())
    assert set(got.results) == {"a", "b"} and got.missing() == {"c"}
    assert got.stopped_by == "deadline"
    assert 0.15 < got.elapsed_s < LATE_S / 2
    assert drained == ["c"] and calls.finished["c"] == "ok"


def test_deadline_returns_early_when_everyone_answered() -> None:
    calls = Calls()
    primary = {k: calls.make(k, FAST_S) for k in "ab"}
    got = run(collect(primary, FanoutPolicy(mode="deadline", deadline_ms=5000.0)))
    assert set(got.results) == {"a", "b"}
    assert got.stopped_by == "complete" and got.elapsed_s < 2.5


def test_hedge_is_sent_after_its_delay_and_the_faster_answer_wins() -> None:
    calls = Calls()

    async def scenario() -> tuple[Collected[str, str], float, list[str]]:
        t0 = asyncio.get_running_loop().time()
        got = await collect(
            {"a": calls.make("a", LATE_S), "b": calls.make("b", FAST_S)},
            FanoutPolicy(hedge=True),
            hedges={"a": calls.make("a'", FAST_S)},
            hedge_after_s={"a": 0.05},
        )
        return got, calls.started["a'"] - t0, await _drain(got)

    got, hedge_sent_after_s, drained = run(scenario())
    assert got.results == {"a": "a'", "b": "b"}
    assert got.hedged == {"a"} and got.answered_by_hedge == {"a"}
    assert hedge_sent_after_s >= 0.04  # not before its delay
    assert got.elapsed_s < LATE_S / 2
    assert drained == ["a"] and calls.finished["a"] == "ok"  # the primary was not cancelled


def test_hedge_at_once_when_the_primary_fails() -> None:
    calls = Calls()
    got = run(
        collect(
            {"a": calls.make("a", FAST_S, ConnectionError("reset"))},
            FanoutPolicy(hedge=True),
            hedges={"a": calls.make("a'", FAST_S)},
            hedge_after_s={"a": 30.0},
        )
    )
    assert got.results == {"a": "a'"} and not got.errors
    assert got.hedged == {"a"} and got.answered_by_hedge == {"a"}
    assert got.elapsed_s < 5.0  # far below the hedge delay


def test_no_hedge_when_the_primary_answers_in_time() -> None:
    calls = Calls()
    got = run(
        collect(
            {"a": calls.make("a", FAST_S)},
            FanoutPolicy(hedge=True),
            hedges={"a": calls.make("a'", FAST_S)},
            hedge_after_s={"a": 5.0},
        )
    )
    assert got.results == {"a": "a"}
    assert not got.hedged and not got.answered_by_hedge and "a'" not in calls.started


def test_a_failed_hedged_pair_lands_in_errors() -> None:
    calls = Calls()
    primary_error = ConnectionError("reset")
    got = run(
        collect(
            {"a": calls.make("a", FAST_S, primary_error), "b": calls.make("b", FAST_S)},
            FanoutPolicy(hedge=True),
            hedges={"a": calls.make("a'", FAST_S, TimeoutError("slow"))},
        )
    )
    assert got.errors == {"a": primary_error} and got.results == {"b": "b"}
    assert got.hedged == {"a"} and not got.answered_by_hedge and not got.late


def test_hedges_are_ignored_unless_the_policy_hedges() -> None:
    calls = Calls()
    got = run(
        collect(
            {"a": calls.make("a", FAST_S, ConnectionError("reset"))},
            FanoutPolicy(),
            hedges={"a": calls.make("a'", FAST_S)},
            hedge_after_s={"a": 0.0},
        )
    )
    assert set(got.errors) == {"a"} and not got.hedged and not calls.started.get("a'")


def test_cancelling_collect_propagates_and_leaves_the_calls_running() -> None:
    finished: list[str] = []

    async def scenario() -> None:
        release = asyncio.Event()
        started = asyncio.Semaphore(0)

        def make(name: str) -> Callable[[], Awaitable[str]]:
            async def call() -> str:
                started.release()
                await release.wait()
                finished.append(name)
                return name

            return call

        task = asyncio.create_task(collect({k: make(k) for k in "ab"}, FanoutPolicy()))
        for _ in "ab":
            await asyncio.wait_for(started.acquire(), timeout=10.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(100):  # a handful of loop turns is enough; bounded to fail, not hang
            if len(finished) == 2:
                break
            await asyncio.sleep(0.01)

    run(scenario())
    assert sorted(finished) == ["a", "b"]


def test_a_failure_seen_at_the_stop_is_an_error_without_a_hedge() -> None:
    """a answers and b fails in the same loop turn: the quorum stops before b's hedge is sent."""
    hedge = Calls()

    async def scenario() -> Collected[str, str]:
        release = asyncio.Event()
        started = asyncio.Semaphore(0)

        def make(name: str, exc: BaseException | None) -> Callable[[], Awaitable[str]]:
            async def call() -> str:
                started.release()
                await release.wait()
                if exc is not None:
                    raise exc
                return name

            return call

        task = asyncio.create_task(
            collect(
                {"a": make("a", None), "b": make("b", ConnectionError("reset"))},
                FanoutPolicy(mode="quorum", quorum_branches=1, grace_ms=0.0, hedge=True),
                hedges={"b": hedge.make("b'", FAST_S)},
            )
        )
        for _ in "ab":
            await asyncio.wait_for(started.acquire(), timeout=10.0)
        release.set()
        return await task

    got = run(scenario())
    assert got.results == {"a": "a"} and isinstance(got.errors.get("b"), ConnectionError)
    assert not got.hedged and not got.late and not hedge.started


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "first"}, "mode must be one of"),
        ({"mode": "quorum"}, "quorum mode needs quorum_branches or quorum_weight"),
        ({"request_timeout_s": 0.0}, "request_timeout_s must be positive"),
        ({"request_timeout_s": float("inf")}, "request_timeout_s must be positive"),
        ({"deadline_ms": -1.0}, "deadline_ms must be positive"),
        ({"grace_ms": -1.0}, "grace_ms must be >= 0"),
        ({"min_branches": 0}, "min_branches must be at least 1"),
        ({"quorum_branches": 1, "min_branches": 2}, "must be at least min_branches"),
        ({"quorum_weight": 0.0}, r"quorum_weight must be in \(0, 1\]"),
        ({"quorum_weight": 1.5}, r"quorum_weight must be in \(0, 1\]"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FanoutPolicy(**kwargs)


@pytest.mark.parametrize(
    ("weights", "hedge_after_s", "message"),
    [
        ({"a": 1.0}, None, "weights lack branches"),
        ({"a": 1.0, "b": -1.0}, None, "finite and >= 0"),
        ({"a": 0.0, "b": 0.0}, None, "sum to zero"),
        (None, {"a": -0.1}, "hedge_after_s"),
    ],
)
def test_collect_rejects_bad_arguments_before_calling(
    weights: dict[str, float] | None, hedge_after_s: dict[str, float] | None, message: str
) -> None:
    calls = Calls()
    primary = {k: calls.make(k, FAST_S) for k in "ab"}
    with pytest.raises(ValueError, match=message):
        run(collect(primary, FanoutPolicy(), weights=weights, hedge_after_s=hedge_after_s))
    assert not calls.started


def test_no_branches_returns_at_once() -> None:
    got = run(collect({}, FanoutPolicy()))
    assert got.stopped_by == "complete" and not got.results and not got.enough
