"""Per-layer fan-out: send a layer's input to every branch, and wait as the policy says.

One pure async function, :func:`collect`, modelled on hivemind's ``_collect_responses``: start
every call at once, wait for enough answers (all of them; a quorum, then a short grace; or what
came within a deadline), then stop waiting without cancelling the stragglers. Cancelling a call
half-way could leave a hole in a remote node's KV cache, so late calls keep running and are
handed back for the caller to let finish. With hedging, a branch that is slow (past its own
delay) or whose call failed is also sent to its second replica, and the first success wins.

Calls are plain ``Callable[[], Awaitable[T]]``: no gRPC here, so the policy is unit-tested with
fake coroutines and any transport can use it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Call = Callable[[], Awaitable[T]]

MODES = ("all", "quorum", "deadline")
STOP_REASONS = ("complete", "quorum", "deadline", "timeout")
_WEIGHT_RTOL = 1e-9  # 0.3 + 0.2 must meet a quorum of 0.5 despite rounding

# The event loop holds tasks only weakly: a call left running after collect() stopped waiting
# (or was cancelled) is kept alive here until it finishes, as the asyncio docs advise.
_RUNNING: set[asyncio.Task[Any]] = set()


@dataclass(frozen=True)
class FanoutPolicy:
    """How long one layer's fan-out waits, and for what. Built once from the CLI."""

    mode: str = "all"  # "all" | "quorum" | "deadline"
    request_timeout_s: float = 10.0  # bounds the wait in every mode, counted from sending
    quorum_branches: int | None = None  # quorum: this many successful branches...
    quorum_weight: float | None = None  # ...or this fraction of the aggregation weight
    grace_ms: float = 5.0  # quorum: extra wait once met, for answers just behind
    deadline_ms: float = 100.0  # deadline: take what answered by then
    min_branches: int = 1  # fewer successes and the caller fails the request
    hedge: bool = False  # also send slow or failed branches to their second replica

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fan-out mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if not (math.isfinite(self.deadline_ms) and self.deadline_ms > 0):
            raise ValueError(f"deadline_ms must be positive, got {self.deadline_ms}")
        if not (math.isfinite(self.grace_ms) and self.grace_ms >= 0):
            raise ValueError(f"grace_ms must be >= 0, got {self.grace_ms}")
        if self.min_branches < 1:
            raise ValueError(f"min_branches must be at least 1, got {self.min_branches}")
        if self.quorum_branches is not None and self.quorum_branches < self.min_branches:
            raise ValueError(
                f"quorum_branches ({self.quorum_branches}) must be at least "
                f"min_branches ({self.min_branches})"
            )
        if self.quorum_weight is not None and not 0 < self.quorum_weight <= 1:
            raise ValueError(f"quorum_weight must be in (0, 1], got {self.quorum_weight}")
        if self.mode == "quorum" and self.quorum_branches is None and self.quorum_weight is None:
            raise ValueError("quorum mode needs quorum_branches or quorum_weight")

    def summary(self) -> str:
        """One line for people: the mode with what it waits for, then the common bounds."""
        if self.mode == "quorum":
            wants = [] if self.quorum_branches is None else [f"{self.quorum_branches} branches"]
            if self.quorum_weight is not None:
                wants.append(f"{self.quorum_weight:.0%} of the weight")
            head = f"quorum of {' or '.join(wants)}, grace {self.grace_ms:g} ms"
        elif self.mode == "deadline":
            head = f"deadline {self.deadline_ms:g} ms"
        else:
            head = "all branches"
        hedge = ", hedged" if self.hedge else ""
        return (
            f"{head}{hedge}, timeout {self.request_timeout_s:g} s, "
            f"at least {self.min_branches} branch(es)"
        )

    @property
    def wait_limit_s(self) -> float:
        """The longest wait from sending: the deadline, or the request timeout."""
        if self.mode == "deadline":
            return min(self.deadline_ms / 1000, self.request_timeout_s)
        return self.request_timeout_s


@dataclass(frozen=True)
class Collected(Generic[K, T]):
    """What a fan-out got back, and the calls it left running."""

    branches: tuple[K, ...]  # every branch asked, in the caller's order
    results: dict[K, T]  # successful answers: the first success of primary and hedge
    errors: dict[K, BaseException]  # branches whose every call failed: the primary's error
    late: dict[K, list[asyncio.Task[T]]]  # calls still running at the stop, never cancelled
    hedged: set[K]  # branches for which a hedge call was sent
    answered_by_hedge: set[K]  # branches whose result came from the hedge call
    elapsed_s: float
    stopped_by: str  # one of STOP_REASONS, for metrics
    min_branches: int

    def missing(self) -> set[K]:
        """Branches without a result (failed or late): the aggregation masks them."""
        return {key for key in self.branches if key not in self.results}

    @property
    def enough(self) -> bool:
        """Whether enough branches answered for the caller to fuse them."""
        return len(self.results) >= self.min_branches

    def late_calls(self) -> list[asyncio.Task[T]]:
        """Every call left running, e.g. to ``asyncio.gather(..., return_exceptions=True)``."""
        return [call for calls in self.late.values() for call in calls]


async def collect(
    primary: Mapping[K, Call[T]],
    policy: FanoutPolicy,
    *,
    weights: Mapping[K, float] | None = None,
    hedges: Mapping[K, Call[T]] | None = None,
    hedge_after_s: Mapping[K, float] | None = None,
) -> Collected[K, T]:
    """Call every branch at once and return when ``policy`` says to stop waiting.

    ``weights`` are the branches' aggregation weights (uniform if omitted), used by
    ``quorum_weight`` as a fraction of their sum. A quorum also needs ``min_branches``
    successes (stopping earlier would doom the request), and ``quorum_branches`` beyond the
    number of branches means all of them. Every mode stops as soon as each branch has an
    outcome.

    With ``policy.hedge``, a branch in ``hedges`` is also sent to its second replica once
    ``hedge_after_s[key]`` has passed since sending with no answer, or at once when its primary
    call fails; a branch without a delay is hedged on failure only. It fails only when every
    call sent for it failed.

    Exceptions from calls never propagate: they land in ``errors``. Calls are never cancelled,
    not when collect() stops waiting (they are returned in ``late``), and not when collect()
    itself is cancelled: the ``CancelledError`` propagates and the calls run to completion
    unobserved. Their exceptions are marked retrieved so that asyncio does not log them.
    """
    shares = _weight_shares(primary, weights)
    delays = dict(hedge_after_s or {})
    for key, delay in delays.items():
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"hedge_after_s[{key!r}] must be >= 0, got {delay}")
    spares = dict(hedges or {}) if policy.hedge else {}

    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + policy.wait_limit_s
    branches = {
        key: _Branch(f"fanout:{key}", call, spares.get(key), start + delays.get(key, math.inf))
        for key, call in primary.items()
    }
    quorum = _Quorum(policy, len(branches))
    grace_end = math.inf
    while True:
        now = loop.time()
        for branch in branches.values():
            if not branch.settled:
                branch.settle()
        open_ = [branch for branch in branches.values() if not branch.settled]
        if not open_:
            stopped_by = "complete"
            break
        if grace_end == math.inf and quorum.met(branches, shares):
            grace_end = min(now + policy.grace_ms / 1000, stop_at)
        if now >= grace_end:
            stopped_by = "quorum"
            break
        if now >= stop_at:
            stopped_by = "deadline" if policy.mode == "deadline" else "timeout"
            break
        for branch in open_:  # only while still waiting: a hedge sent now could still count
            branch.hedge_if_due(now)
        wake = min(stop_at, grace_end, *(branch.next_hedge_at for branch in open_))
        pending = {call for branch in open_ for call in branch.calls if not call.done()}
        # No internal task to clean up: if we are cancelled here, asyncio.wait drops its own
        # callbacks and the calls keep running.
        timeout = max(0.0, wake - now)
        # Each answer matters on its own only to a quorum or to a hedged branch (settled by the
        # first of its calls, hedged at once when its primary fails); otherwise one wake-up when
        # all are in (or at the time limit) does.
        eager = quorum.enabled or any(branch.hedges for branch in open_)
        when = asyncio.FIRST_COMPLETED if eager else asyncio.ALL_COMPLETED
        await asyncio.wait(pending, timeout=timeout, return_when=when)

    for branch in branches.values():
        branch.close()
    return Collected(
        branches=tuple(branches),
        results={k: b.result for k, b in branches.items() if b.settled and b.error is None},
        errors={k: b.error for k, b in branches.items() if b.error is not None},
        late={k: calls for k, b in branches.items() if (calls := b.running())},
        hedged={k for k, b in branches.items() if len(b.calls) > 1},
        answered_by_hedge={k for k, b in branches.items() if b.by_hedge},
        elapsed_s=loop.time() - start,
        stopped_by=stopped_by,
        min_branches=policy.min_branches,
    )


class _Branch(Generic[T]):
    """The calls sent for one branch, and its outcome once it has one."""

    def __init__(self, name: str, primary: Call[T], hedge: Call[T] | None, hedge_at: float):
        self.name = name
        self.calls: list[asyncio.Task[T]] = [_start(primary, f"{name}:primary")]
        self.settled = False
        self.result: T
        self.error: BaseException | None = None
        self.by_hedge = False
        self._hedge = hedge  # None once sent, or when there is none to send
        self._hedge_at = hedge_at  # loop time of the timed hedge; inf: on failure only

    @property
    def hedges(self) -> bool:
        """Has a hedge to send, or sent one."""
        return self._hedge is not None or len(self.calls) > 1

    @property
    def next_hedge_at(self) -> float:
        return math.inf if self._hedge is None else self._hedge_at

    def hedge_if_due(self, now: float) -> None:
        if self._hedge is None:
            return
        primary = self.calls[0]
        due = _failure(primary) is not None if primary.done() else now >= self._hedge_at
        if due:
            self.calls.append(_start(self._hedge, f"{self.name}:hedge"))
            self._hedge = None

    def settle(self) -> None:
        """Take the first finished success (the primary's if both), or fail when every call
        failed and no hedge is left to send (a failed primary with a spare stays open)."""
        for index, call in enumerate(self.calls):
            if call.done() and _failure(call) is None:
                self.result = call.result()
                self.by_hedge = index > 0
                self.settled = True
                return
        if self._hedge is None and all(call.done() for call in self.calls):
            self.error = _failure(self.calls[0])
            self.settled = True

    def close(self) -> None:
        """At the stop: a primary that failed with its hedge not yet sent is a failure."""
        self._hedge = None
        if not self.settled:
            self.settle()

    def running(self) -> list[asyncio.Task[T]]:
        return [call for call in self.calls if not call.done()]


class _Quorum:
    """The quorum condition: enough successful branches by count or by weight."""

    def __init__(self, policy: FanoutPolicy, n_branches: int) -> None:
        self.enabled = policy.mode == "quorum"
        count = policy.quorum_branches
        self.count = None if count is None else min(count, n_branches)
        self.fraction = policy.quorum_weight
        self.floor = min(policy.min_branches, n_branches)

    def met(self, branches: Mapping[Any, _Branch[Any]], shares: Mapping[Any, float]) -> bool:
        if not self.enabled:
            return False
        ok = [key for key, b in branches.items() if b.settled and b.error is None]
        if len(ok) < self.floor:
            return False
        if self.count is not None and len(ok) >= self.count:
            return True
        return self.fraction is not None and (
            sum(shares[key] for key in ok) >= self.fraction * (1 - _WEIGHT_RTOL)
        )


def _weight_shares(primary: Mapping[K, Any], weights: Mapping[K, float] | None) -> dict[K, float]:
    """Each branch's share of the total aggregation weight (uniform without weights)."""
    if not primary:
        return {}
    if weights is None:
        return {key: 1.0 / len(primary) for key in primary}
    missing = [key for key in primary if key not in weights]
    if missing:
        raise ValueError(f"weights lack branches {missing!r}")
    bad = [key for key in primary if not (math.isfinite(weights[key]) and weights[key] >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and >= 0, not for branches {bad!r}")
    total = sum(weights[key] for key in primary)
    if total <= 0:
        raise ValueError("the branches' weights sum to zero")
    return {key: weights[key] / total for key in primary}


def _start(call: Call[T], name: str) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(_run(call), name=name)
    _RUNNING.add(task)
    task.add_done_callback(_finished)
    return task


async def _run(call: Call[T]) -> T:
    return await call()  # inside the task, so that a factory raising at once is a failed call


def _finished(task: asyncio.Task[Any]) -> None:
    _RUNNING.discard(task)
    _failure(task)  # marks the exception retrieved: an unobserved late call logs nothing


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception a finished call ended with (a ``CancelledError`` if it was cancelled)."""
    if task.cancelled():
        return asyncio.CancelledError(f"{task.get_name()} was cancelled")
    return task.exception()
