"""The node's session store (positions, owners, quotas, limits) and its branch batcher."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mbt_core.errors import (
    CacheBehind,
    LimitExceeded,
    NotSessionOwner,
    OutOfContext,
    SessionEnded,
)
from mbt_core.model.blocks import Branch
from mbt_core.model.config import ModelConfig
from mbt_core.model.kv import KVSlots
from mbt_core.wire.contract import SessionStep
from mbt_node.batcher import BranchBatcher
from mbt_node.config import BatchingConfig, NodeLimits
from mbt_node.sessions import Caller, SessionStore

CFG = ModelConfig(
    vocab_size=300, d_model=16, n_heads=2, context_length=32, n_layers=1, branches=(1,)
)
KEY = (0, 0)
GATEWAY = Caller("cert:gateway", authenticated=True)
OTHER_GATEWAY = Caller("cert:other", authenticated=True)
HOST = Caller("host:ipv6:[::1]", authenticated=False)
SECRET = b"s" * 16


def step(sid: str, start: int, n: int, secret: bytes = SECRET) -> SessionStep:
    return SessionStep(sid, start, n, secret)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _store(
    clock: Clock | None = None, pool: KVSlots | None = None, **limits: float
) -> tuple[SessionStore, Branch]:
    """A store whose caches live in a slot pool, as a node's do."""
    torch.manual_seed(0)
    branch = Branch(CFG).eval()
    slots = pool or KVSlots(CFG, torch.float32, "cpu")
    store = SessionStore(
        NodeLimits(**limits), CFG.context_length, lambda k: slots.new_cache(), clock or Clock()
    )
    return store, branch


def _fill(
    store: SessionStore, branch: Branch, sid: str, start: int, n: int, caller: Caller = GATEWAY
) -> None:
    caches = store.reserve(KEY, [step(sid, start, n)], caller)
    with torch.no_grad():
        branch(torch.randn(1, n, CFG.d_model), caches[0])
    store.finish(caches)


def test_gap_is_failed_precondition_with_length() -> None:
    store, branch = _store()
    _fill(store, branch, "sess-4f2a", 0, 4)
    with pytest.raises(CacheBehind) as err:
        store.reserve(KEY, [step("sess-4f2a", 6, 1)], GATEWAY)
    assert err.value.length == 4
    assert "sess-4f2a" not in str(err.value)  # ids are the gateway's secrets: never shown
    assert store.length("sess-4f2a", KEY) == 4  # nothing changed


def test_earlier_start_rolls_back() -> None:
    store, branch = _store()
    _fill(store, branch, "s", 0, 6)
    (cache,) = store.reserve(KEY, [step("s", 2, 1)], GATEWAY)
    assert cache.length == 2


def test_all_or_nothing_when_one_step_fails() -> None:
    store, branch = _store()
    _fill(store, branch, "a", 0, 5)
    with pytest.raises(CacheBehind):
        store.reserve(KEY, [step("a", 1, 1), step("b", 3, 1)], GATEWAY)  # b has a gap
    assert store.length("a", KEY) == 5  # a was not rolled back
    assert store.session_count == 1  # b was not created


def test_idle_sessions_expire_after_ttl() -> None:
    clock = Clock()
    store, branch = _store(clock, session_ttl_s=10.0)
    _fill(store, branch, "old", 0, 3)
    clock.now = 5.0
    _fill(store, branch, "new", 0, 3)
    clock.now = 12.0
    store.reserve(KEY, [step("new", 3, 1)], GATEWAY)  # any call sweeps
    assert store.length("old", KEY) == 0 and store.length("new", KEY) == 3
    assert store.session_count == 1


def test_token_and_session_limits() -> None:
    store, branch = _store(max_cached_tokens=10, max_sessions=2)
    _fill(store, branch, "a", 0, 8)
    with pytest.raises(LimitExceeded, match=r"\(--max-cached-tokens\)") as err:
        store.reserve(KEY, [step("b", 0, 3)], GATEWAY)
    assert err.value.limit == "max_cached_tokens"
    store.reserve(KEY, [step("a", 0, 8)], GATEWAY)  # a rollback frees what it recomputes
    _fill(store, branch, "b", 0, 2)
    with pytest.raises(LimitExceeded, match="its limit is 2"):
        store.reserve(KEY, [step("c", 0, 1)], GATEWAY)
    assert store.end("a", SECRET, GATEWAY) == 1
    store.reserve(KEY, [step("c", 0, 1)], GATEWAY)
    assert store.counts["refused:max_cached_tokens"] == 1
    assert store.counts["refused:max_sessions"] == 1


def test_ending_a_session_frees_its_positions_for_others() -> None:
    """The position limit counts every cache of every branch; an ended or rolled-back
    session's positions count no more."""
    store, branch = _store(max_cached_tokens=20)
    _fill(store, branch, "a", 0, 6)
    store.reserve((0, 1), [step("a", 0, 6)], GATEWAY)  # a's cache of another branch
    _fill(store, branch, "b", 0, 8)
    with pytest.raises(LimitExceeded, match="node caches 20 positions"):
        store.reserve(KEY, [step("c", 0, 1)], GATEWAY)
    store.reserve(KEY, [step("b", 0, 1)], GATEWAY)  # b rolls back to 0, recomputes one
    store.reserve(KEY, [step("c", 0, 7)], GATEWAY)  # 6 + 6 + 1 + 7 = 20
    assert store.end("a", SECRET, GATEWAY) == 2
    store.reserve(KEY, [step("d", 0, 12)], GATEWAY)
    with pytest.raises(LimitExceeded, match="node caches 20 positions"):
        store.reserve(KEY, [step("e", 0, 1)], GATEWAY)


def test_context_overflow_is_out_of_range() -> None:
    store, _ = _store()
    with pytest.raises(OutOfContext):
        store.reserve(KEY, [step("s", 30, 3)], GATEWAY)


def test_batcher_merges_concurrent_calls_into_one_forward() -> None:
    store, branch = _store()
    calls: list[list[int]] = []
    original = branch.forward_ragged

    def counting(packed, caches, lengths):  # type: ignore[no-untyped-def]
        calls.append(list(lengths))
        return original(packed, caches, lengths)

    branch.forward_ragged = counting  # type: ignore[method-assign]
    inputs = [torch.randn(n, CFG.d_model) for n in (3, 1, 2, 5)]

    async def main() -> list[torch.Tensor]:
        with ThreadPoolExecutor(1) as pool:
            batcher = BranchBatcher(KEY, branch, store, pool, BatchingConfig(max_wait_ms=20))
            batcher.start()
            results = await asyncio.gather(
                *(
                    batcher.submit([step(f"s{i}", 0, len(x))], x, GATEWAY)
                    for i, x in enumerate(inputs)
                )
            )
            # the same session twice: the second call must wait for the next batch
            again = await asyncio.gather(
                batcher.submit([step("s0", 3, 1)], torch.randn(1, CFG.d_model), GATEWAY),
                batcher.submit([step("s0", 4, 1)], torch.randn(1, CFG.d_model), GATEWAY),
            )
            await batcher.stop()
        assert all(r.batch_steps == 1 for r in again)
        return [r.outputs for r in results]

    outs = asyncio.run(main())
    assert calls[0] == [3, 1, 2, 5]  # four calls, one batched forward
    assert calls[1:] == [[1], [1]]
    for x, out in zip(inputs, outs, strict=True):
        with torch.no_grad():
            assert (branch(x[None])[0] - out).abs().max().item() < 1e-6


def test_batcher_reports_refusals_per_call() -> None:
    store, branch = _store()

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = BranchBatcher(KEY, branch, store, pool, BatchingConfig(max_wait_ms=20))
            batcher.start()
            results = await asyncio.gather(
                batcher.submit([step("ok", 0, 2)], torch.randn(2, CFG.d_model), GATEWAY),
                batcher.submit([step("gap", 5, 1)], torch.randn(1, CFG.d_model), GATEWAY),
                return_exceptions=True,
            )
            await batcher.stop()
            return results

    ok, gap = asyncio.run(main())
    assert isinstance(gap, CacheBehind) and gap.length == 0
    assert not isinstance(ok, BaseException) and ok.outputs.shape == (2, CFG.d_model)


def test_a_small_call_on_an_idle_batcher_runs_at_once() -> None:
    """Without a worker (never started) only the direct path can answer: a small call on an
    idle batcher is answered, a refusal raised; a larger call, or a small one behind it in the
    queue, waits for the worker and then still merges into one batch."""
    store, branch = _store()
    xs = [torch.randn(n, CFG.d_model) for n in (2, 3, 1)]

    async def main() -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        with ThreadPoolExecutor(1) as pool:
            batcher = BranchBatcher(
                KEY, branch, store, pool, BatchingConfig(direct_max_positions=2)
            )
            small = await batcher.submit([step("a", 0, 2)], xs[0], GATEWAY)
            with pytest.raises(CacheBehind):
                await batcher.submit([step("gap", 5, 1)], xs[2], GATEWAY)
            big = asyncio.ensure_future(batcher.submit([step("b", 0, 3)], xs[1], GATEWAY))
            behind = asyncio.ensure_future(batcher.submit([step("c", 0, 1)], xs[2], GATEWAY))
            await asyncio.sleep(0.05)
            assert not big.done() and not behind.done()
            batcher.start()
            results = await asyncio.gather(big, behind)
            await batcher.stop()
        return small.outputs, [r.outputs for r in results], [r.batch_steps for r in results]

    small, queued, steps = asyncio.run(main())
    assert steps == [2, 2]  # the two queued calls ran as one batch
    with torch.no_grad():
        for x, out in zip(xs, [small, *queued], strict=True):
            assert (branch(x[None])[0] - out).abs().max().item() < 1e-6


def test_ended_and_expired_sessions_give_their_slots_back() -> None:
    clock, pool = Clock(), KVSlots(CFG, torch.float32, "cpu")
    store, branch = _store(clock, pool, session_ttl_s=10.0)
    for i in range(8):
        _fill(store, branch, f"s{i}", 0, 3)
    assert pool.capacity == 8
    store.end("s0", SECRET, GATEWAY)
    clock.now = 5.0
    _fill(store, branch, "s1", 3, 1)  # s1 stays fresh
    clock.now = 12.0
    _fill(store, branch, "new", 0, 2)  # the sweep expires s2..s7
    assert store.session_count == 2
    for i in range(6):  # six more sessions fit in the 8 slots: the freed ones were reused
        _fill(store, branch, f"t{i}", 0, 2)
    assert pool.capacity == 8
    _fill(store, branch, "one-more", 0, 2)
    assert pool.capacity == 16


# --- owners, quotas, precedence ----------------------------------------------------------------


def test_a_session_belongs_to_its_opener() -> None:
    """Another certificate, or the right certificate with another secret, can neither write to,
    roll back nor end the session; the refusals name no session id."""
    store, branch = _store()
    _fill(store, branch, "live", 0, 5)
    for caller, secret in ((OTHER_GATEWAY, SECRET), (GATEWAY, b"x" * 16), (HOST, SECRET)):
        with pytest.raises(NotSessionOwner) as err:
            store.reserve(KEY, [step("live", 5, 1, secret)], caller)  # a write
        assert "live" not in str(err.value)
        with pytest.raises(NotSessionOwner):
            store.reserve(KEY, [step("live", 0, 1, secret)], caller)  # a rollback
        with pytest.raises(NotSessionOwner):
            store.end("live", secret, caller)
    assert store.length("live", KEY) == 5 and store.counts["not_owner"] == 9
    _fill(store, branch, "live", 5, 1)  # the owner goes on
    assert store.length("live", KEY) == 6


def test_an_ended_session_refuses_a_late_step() -> None:
    """A late call (a straggler past the deadline) must not open an ended session again: its
    caches would stay on the node until they expire."""
    store, branch = _store()
    _fill(store, branch, "s", 0, 3)
    assert store.end("s", SECRET, GATEWAY) == 1
    with pytest.raises(SessionEnded):
        store.reserve(KEY, [step("s", 3, 1)], GATEWAY)
    assert store.session_count == 0 and store.cached_tokens() == 0
    assert store.end("s", SECRET, GATEWAY) == 0  # ending again is harmless


def test_an_end_that_overtakes_the_first_step_still_refuses_it() -> None:
    """A node resumed after a pause may read the gateway's EndSession (a retry on a new
    connection) before the session's first Forward (queued on the old one): the late step must
    not open the session then (a churn soak found such sessions left on nodes)."""
    store, _ = _store()
    assert store.end("never-opened", SECRET, GATEWAY) == 0
    with pytest.raises(SessionEnded):
        store.reserve(KEY, [step("never-opened", 0, 2)], GATEWAY)
    assert store.session_count == 0 and store.cached_tokens() == 0


def test_per_caller_quotas() -> None:
    store, branch = _store(max_sessions_per_caller=2, max_cached_tokens_per_caller=10)
    _fill(store, branch, "h1", 0, 4, HOST)
    _fill(store, branch, "h2", 0, 4, HOST)
    with pytest.raises(LimitExceeded, match="--max-sessions-per-caller") as err:
        store.reserve(KEY, [step("h3", 0, 1)], HOST)
    assert err.value.limit == "max_sessions_per_caller"
    with pytest.raises(LimitExceeded, match="--max-cached-tokens-per-caller"):
        store.reserve(KEY, [step("h1", 4, 3)], HOST)
    _fill(store, branch, "g1", 0, 8)  # another caller has its own quota
    assert store.counts["refused:max_sessions_per_caller"] == 1


def test_an_authenticated_caller_takes_the_room_of_idle_anonymous_sessions() -> None:
    clock = Clock()
    store, branch = _store(clock, max_sessions=3, max_sessions_per_caller=4)
    for i in range(3):  # a plaintext host fills the node
        clock.now = float(i)
        _fill(store, branch, f"h{i}", 0, 2, HOST)
    with pytest.raises(LimitExceeded, match="node holds 3 sessions"):
        store.reserve(KEY, [step("h9", 0, 1)], HOST)  # anonymous: no precedence
    clock.now = 10.0
    _fill(store, branch, "g", 0, 2)  # the gateway's session evicts the oldest one
    assert store.length("h0", KEY) == 0 and store.length("h1", KEY) == 2
    assert store.counts["evicted"] == 1 and store.session_count == 3
    # an evicted session's owner is told to replay, not refused as ended
    with pytest.raises(CacheBehind) as err:
        store.reserve(KEY, [step("h0", 2, 1)], HOST)
    assert err.value.length == 0


def test_a_cache_in_use_is_released_only_when_its_forward_finishes() -> None:
    """Ending (or evicting) a session whose cache a forward still writes into must not hand its
    slot to another session meanwhile."""
    pool = KVSlots(CFG, torch.float32, "cpu")
    store, _ = _store(pool=pool)
    held = store.reserve(KEY, [step("a", 0, 2)], GATEWAY)  # a forward is running on it
    store.end("a", SECRET, GATEWAY)
    (other,) = store.reserve(KEY, [step("b", 0, 2)], GATEWAY)
    assert other.slot != held[0].slot  # type: ignore[attr-defined]
    store.finish(held)
    (third,) = store.reserve(KEY, [step("c", 0, 2)], GATEWAY)
    assert third.slot == held[0].slot  # type: ignore[attr-defined]
