"""A node's slot pool of keys and values: batched sessions read and write it with one op per
block, and must compute what each session computes alone with a cache of its own."""

import torch

from mbt_core.model.blocks import Branch
from mbt_core.model.config import ModelConfig
from mbt_core.model.kv import KVSlots, SlotCache, truncate_all


def _branch(cfg: ModelConfig) -> Branch:
    torch.manual_seed(0)
    return Branch(cfg).eval()


def test_slot_batches_equal_each_session_alone(tiny_config: ModelConfig) -> None:
    """A ragged prefill, a ragged second step, then one-token steps; more sessions than the
    first allocation of slots, so the pool grows while caches hold positions."""
    branch, d = _branch(tiny_config), tiny_config.d_model
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    lengths = [6, 11, 2, 17, 5, 9, 3, 8, 4, 7]  # 10 sessions > 8 first slots
    seqs = [torch.randn(n + 3, d) for n in lengths]
    with torch.inference_mode():
        alone = [branch(s[None])[0] for s in seqs]
        caches = [pool.new_cache() for _ in seqs[:8]]
        cuts = [max(1, n // 2) for n in lengths]
        out = [
            branch.forward_ragged(
                torch.cat([s[:c] for s, c in zip(seqs, cuts, strict=True)][:8]), caches, cuts[:8]
            )
        ]
        caches += [pool.new_cache() for _ in seqs[8:]]  # the pool grows to 16 slots here
        assert pool.capacity == 16
        firsts = [cuts[i] if i < 8 else 0 for i in range(10)]
        rest = [n - f for n, f in zip(lengths, firsts, strict=True)]
        out.append(
            branch.forward_ragged(
                torch.cat([s[f:n] for s, f, n in zip(seqs, firsts, lengths, strict=True)]),
                caches,
                rest,
            )
        )
        steps = [
            branch.forward_ragged(
                torch.stack([s[n + j] for s, n in zip(seqs, lengths, strict=True)]),
                caches,
                [1] * 10,
            )
            for j in range(3)
        ]
    first = list(out[0].split(cuts[:8])) + [torch.zeros(0, d)] * 2
    second = out[1].split(rest)
    for i, a in enumerate(alone):
        got = torch.cat([first[i], second[i], *(s[i : i + 1] for s in steps)])
        assert (a - got).abs().max().item() < 1e-5, i
    assert [c.length for c in caches] == [n + 3 for n in lengths]


def test_one_session_in_a_slot_is_bit_identical_to_a_cache_of_its_own(
    tiny_config: ModelConfig,
) -> None:
    branch, d = _branch(tiny_config), tiny_config.d_model
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    pool.new_cache()  # not slot 0: another session's slot sits before it
    h = torch.randn(12, d)
    own, slotted = branch.new_cache(), pool.new_cache()
    with torch.inference_mode():
        a = torch.cat(
            [
                branch.forward_ragged(h[:7], [own], [7]),
                *(branch.forward_ragged(h[i : i + 1], [own], [1]) for i in range(7, 12)),
            ]
        )
        b = torch.cat(
            [
                branch.forward_ragged(h[:7], [slotted], [7]),
                *(branch.forward_ragged(h[i : i + 1], [slotted], [1]) for i in range(7, 12)),
            ]
        )
    assert torch.equal(a, b)


def _poison(branch: Branch, pool: KVSlots, positions: int) -> SlotCache:
    """A cache whose slot holds NaN keys and values (huge inputs overflow the layer norm)."""
    cache = pool.new_cache()
    x = torch.randn(positions, branch.cfg.d_model) * 3e38
    assert not torch.isfinite(branch.forward_ragged(x, [cache], [positions])).all()
    assert not torch.isfinite(pool.keys[0][cache.slot, :, :positions]).all()
    return cache


def _check_short_with_long(branch: Branch, short_cache: SlotCache, long_cache: SlotCache) -> None:
    """A new 3-position session batched with a 15-position one reads 12 positions past its
    end (masked): they must not change what either computes."""
    assert short_cache.length == long_cache.length == 0
    short, long = torch.randn(3, branch.cfg.d_model), torch.randn(15, branch.cfg.d_model)
    together = branch.forward_ragged(torch.cat([short, long]), [short_cache, long_cache], [3, 15])
    assert (together[:3] - branch(short[None])[0]).abs().max().item() < 1e-5
    assert (together[3:] - branch(long[None])[0]).abs().max().item() < 1e-5


def test_a_reused_slot_leaks_nothing(tiny_config: ModelConfig) -> None:
    """NaN left in a slot must not reach the session that takes the slot next."""
    branch = _branch(tiny_config)
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    with torch.inference_mode():
        poisoned = _poison(branch, pool, 20)
        poisoned.release()
        taken = pool.new_cache()
        assert taken.slot == poisoned.slot
        _check_short_with_long(branch, taken, pool.new_cache())


def test_a_rolled_back_slot_forgets_what_it_cut(tiny_config: ModelConfig) -> None:
    """After a rollback to 0 the session's old NaN positions are forgotten, also where a
    longer session in the same batch makes it read past its end."""
    branch = _branch(tiny_config)
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    with torch.inference_mode():
        poisoned = _poison(branch, pool, 20)
        poisoned.truncate(0)
        _check_short_with_long(branch, poisoned, pool.new_cache())


def test_rollback_in_a_slot_recomputes_in_a_batch(tiny_config: ModelConfig) -> None:
    branch, d = _branch(tiny_config), tiny_config.d_model
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    a, b = pool.new_cache(), pool.new_cache()
    x, y = torch.randn(10, d), torch.randn(11, d)
    with torch.inference_mode():
        branch.forward_ragged(torch.cat([x, y[:10]]), [a, b], [10, 10])
        a.truncate(4)  # recompute positions 4 and 5 while b takes one more step
        redo = branch.forward_ragged(torch.cat([x[4:6], y[10:]]), [a, b], [2, 1])
        alone_x, alone_y = branch(x[None, :6])[0], branch(y[None])[0]
    assert (redo[:2] - alone_x[4:6]).abs().max().item() < 1e-5
    assert (redo[2:] - alone_y[10:]).abs().max().item() < 1e-5
    assert (a.length, b.length) == (6, 11)


def test_many_sessions_roll_back_together_and_forget_only_what_they_cut(
    tiny_config: ModelConfig,
) -> None:
    """A batch's rollbacks are zeroed in one op per pool: each cache loses exactly the
    positions past its new length (the others of its slot, and other slots, stay)."""
    branch, d = _branch(tiny_config), tiny_config.d_model
    pool = KVSlots(tiny_config, torch.float32, "cpu")
    caches = [pool.new_cache() for _ in range(4)]
    with torch.inference_mode():
        branch.forward_ragged(torch.randn(4 * 9, d), caches, [9] * 4)
    before = pool.kv.clone()
    cuts = [(caches[0], 3), (caches[1], 9), (caches[2], 0), (caches[3], 8)]  # one is no cut
    truncate_all(cuts)  # type: ignore[arg-type]
    assert [c.length for c in caches] == [3, 9, 0, 8]
    expected = before.clone()
    for cache, length in cuts:
        expected[:, :, cache.slot, :, length:9] = 0
    assert torch.equal(pool.kv, expected)
    assert not torch.equal(pool.kv[:, :, caches[1].slot], torch.zeros_like(pool.kv[:, :, 0]))
