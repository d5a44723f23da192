import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from mbt_core.branch import Branch, KVSlots
from mbt_core.config import ModelConfig
from mbt_node.batcher import BranchBatcher
from mbt_node.config import BatchingConfig, NodeLimits
from mbt_node.sessions import SessionStore, Step
from mbt_node.status import StatusError

CFG = ModelConfig(
    vocab_size=300, d_model=16, n_heads=2, context_length=32, n_layers=1, branches=(1,)
)
KEY = (0, 0)


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


def _fill(store: SessionStore, branch: Branch, sid: str, start: int, n: int) -> None:
    (cache,) = store.reserve(KEY, [Step(sid, start, n)])
    with torch.no_grad():
        branch(torch.randn(1, n, CFG.d_model), cache)


def test_gap_is_failed_precondition_with_length() -> None:
    store, branch = _store()
    _fill(store, branch, "s", 0, 4)
    with pytest.raises(StatusError) as err:
        store.reserve(KEY, [Step("s", 6, 1)])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.metadata == (("mbt-cache-length", "4"),)
    assert store.length("s", KEY) == 4  # nothing changed


def test_earlier_start_rolls_back() -> None:
    store, branch = _store()
    _fill(store, branch, "s", 0, 6)
    (cache,) = store.reserve(KEY, [Step("s", 2, 1)])
    assert cache.length == 2


def test_all_or_nothing_when_one_step_fails() -> None:
    store, branch = _store()
    _fill(store, branch, "a", 0, 5)
    with pytest.raises(StatusError):
        store.reserve(KEY, [Step("a", 1, 1), Step("b", 3, 1)])  # b has a gap
    assert store.length("a", KEY) == 5  # a was not rolled back
    assert store.session_count == 1  # b was not created


def test_idle_sessions_expire_after_ttl() -> None:
    clock = Clock()
    store, branch = _store(clock, session_ttl_s=10.0)
    _fill(store, branch, "old", 0, 3)
    clock.now = 5.0
    _fill(store, branch, "new", 0, 3)
    clock.now = 12.0
    store.reserve(KEY, [Step("new", 3, 1)])  # any call sweeps
    assert store.length("old", KEY) == 0 and store.length("new", KEY) == 3
    assert store.session_count == 1


def test_token_and_session_limits() -> None:
    store, branch = _store(max_cached_tokens=10, max_sessions=2)
    _fill(store, branch, "a", 0, 8)
    with pytest.raises(StatusError) as err:
        store.reserve(KEY, [Step("b", 0, 3)])
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    store.reserve(KEY, [Step("a", 0, 8)])  # a rollback frees what it recomputes
    _fill(store, branch, "b", 0, 2)
    with pytest.raises(StatusError, match="limit 2"):
        store.reserve(KEY, [Step("c", 0, 1)])
    assert store.end("a") == 1
    store.reserve(KEY, [Step("c", 0, 1)])


def test_ending_a_session_frees_its_positions_for_others() -> None:
    """The position limit counts every cache of every branch; an ended or rolled-back
    session's positions count no more."""
    store, branch = _store(max_cached_tokens=20)
    _fill(store, branch, "a", 0, 6)
    store.reserve((0, 1), [Step("a", 0, 6)])  # a's cache of another branch
    _fill(store, branch, "b", 0, 8)
    with pytest.raises(StatusError, match="node caches 20 positions"):
        store.reserve(KEY, [Step("c", 0, 1)])
    store.reserve(KEY, [Step("b", 0, 1)])  # b rolls back to 0 and recomputes one position
    store.reserve(KEY, [Step("c", 0, 7)])  # 6 + 6 + 1 + 7 = 20
    assert store.end("a") == 2
    store.reserve(KEY, [Step("d", 0, 12)])
    with pytest.raises(StatusError, match="node caches 20 positions"):
        store.reserve(KEY, [Step("e", 0, 1)])


def test_context_overflow_is_out_of_range() -> None:
    store, _ = _store()
    with pytest.raises(StatusError) as err:
        store.reserve(KEY, [Step("s", 30, 3)])
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE


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
                *(batcher.submit([Step(f"s{i}", 0, len(x))], x) for i, x in enumerate(inputs))
            )
            # the same session twice: the second call must wait for the next batch
            again = await asyncio.gather(
                batcher.submit([Step("s0", 3, 1)], torch.randn(1, CFG.d_model)),
                batcher.submit([Step("s0", 4, 1)], torch.randn(1, CFG.d_model)),
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
                batcher.submit([Step("ok", 0, 2)], torch.randn(2, CFG.d_model)),
                batcher.submit([Step("gap", 5, 1)], torch.randn(1, CFG.d_model)),
                return_exceptions=True,
            )
            await batcher.stop()
            return results

    ok, gap = asyncio.run(main())
    assert isinstance(gap, StatusError) and gap.code == grpc.StatusCode.FAILED_PRECONDITION
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
            small = await batcher.submit([Step("a", 0, 2)], xs[0])
            with pytest.raises(StatusError) as gap:
                await batcher.submit([Step("gap", 5, 1)], xs[2])
            assert gap.value.code == grpc.StatusCode.FAILED_PRECONDITION
            big = asyncio.ensure_future(batcher.submit([Step("b", 0, 3)], xs[1]))
            behind = asyncio.ensure_future(batcher.submit([Step("c", 0, 1)], xs[2]))
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
    store.end("s0")
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
