"""Key/value caches of a branch: one batch's cache, the slot pools a node serves many
sessions from, and the two views (uniform, ragged) that attention reads them through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from mbt_core.model.config import ModelConfig


@dataclass
class BranchCache:
    """Keys and values of every block of one branch for one batch of sequences.

    Each block's keys and values live in a buffer that grows by doubling; only the first
    ``length`` positions are valid. A forward writes past ``length`` and the branch advances
    ``length`` once every block succeeded, so a failed forward leaves the cache as it was, and
    a rollback (:meth:`truncate`) copies nothing.
    """

    keys: list[Tensor | None] = field(default_factory=list)  # per block: (B, nh, capacity, hs)
    values: list[Tensor | None] = field(default_factory=list)
    length: int = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a rollback before recomputing)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def release(self) -> None:
        """Give the cache's memory back (it is not used again); buffers of its own need no
        call, the garbage collector frees them."""

    def extend(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write block ``i``'s new keys/values (B, nh, T, hs) after the valid positions and
        return views of all of them, (B, nh, length + T, hs)."""
        end = self.length + k.shape[2]
        buf_k, buf_v = self.keys[i], self.values[i]
        if buf_k is None or buf_v is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if buf_k is not None and buf_v is not None:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            self.keys[i], self.values[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


class KVSlots:
    """Keys and values of many caches of one branch (a node's sessions of it) in one tensor,
    a slot of a whole context window per cache.

    A batch of sessions then writes its new keys and reads every key it attends to with one
    indexed op per block, where caches with buffers of their own need a copy per session. The
    price is a full window of memory per live cache. Positions at or past a cache's length are
    kept zero (a slot is zeroed when taken, and from the cut when rolled back), so that a
    batch that reads them, masked, past a shorter session's end can never meet a NaN there.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_heads: tuple[int, int] | None = None,
    ) -> None:
        """``kv_heads`` is ``(heads, head_dim)`` of the keys a branch stores when they differ
        from the config's (a width slice of a grouped-query attention)."""
        self._blocks = cfg.blocks_per_branch
        heads, head_dim = kv_heads or (cfg.n_heads, cfg.d_model // cfg.n_heads)
        self._shape = (heads, cfg.context_length, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        # (blocks, keys/values, slots, nh, context, hs): a slot is zeroed in one op.
        self.kv = self._zeros(0)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self._free: list[int] = []
        self._views()

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def new_cache(self) -> SlotCache:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.kv[:, :, slot].zero_()
        return SlotCache(keys=[], values=[], slots=self, slot=slot)

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def clear(self, cuts: list[tuple[int, int, int]]) -> None:
        """Zero positions ``start..end`` of each ``(slot, start, end)``: one op for all of them
        (a batch that rolls back many sessions at once would otherwise pay one per session)."""
        cuts = [c for c in cuts if c[2] > c[1]]
        if len(cuts) == 1:
            slot, start, end = cuts[0]
            self.kv[:, :, slot, :, start:end] = 0
        elif cuts:
            device = self.kv.device
            slots = torch.tensor([slot for slot, a, b in cuts for _ in range(a, b)], device=device)
            positions = torch.tensor([p for _, a, b in cuts for p in range(a, b)], device=device)
            self.kv[:, :, slots, :, positions] = 0

    def slot_views(self, slot: int, block: int) -> tuple[Tensor, Tensor]:
        """Keys and values of block ``block`` in slot ``slot``, (nh, context, hs) each: views
        kept until the pool grows, so that a one-session step does not index the pool."""
        views = self._slot_views.get((slot, block))
        if views is None:
            views = self._slot_views[(slot, block)] = (
                self.keys[block][slot],
                self.values[block][slot],
            )
        return views

    def _zeros(self, slots: int) -> Tensor:
        shape = (self._blocks, 2, slots, *self._shape)
        return torch.zeros(shape, dtype=self._dtype, device=self._device)

    def _grow(self) -> None:
        """Double the slots (at least 8); the taken ones keep their contents."""
        old = self.capacity
        new = max(8, 2 * old)
        self.kv = torch.cat([self.kv, self._zeros(new - old)], dim=2)
        self._views()
        self._free.extend(range(new - 1, old - 1, -1))

    def _views(self) -> None:
        self.keys = [self.kv[i, 0] for i in range(self._blocks)]  # (slots, nh, context, hs)
        self.values = [self.kv[i, 1] for i in range(self._blocks)]
        self._slot_views: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}


@dataclass
class SlotCache(BranchCache):
    """A cache whose keys and values live in slot ``slot`` of ``slots``."""

    slots: KVSlots | None = None
    slot: int = -1
    _released: bool = False

    def truncate(self, length: int) -> None:
        truncate_all([(self, length)])

    def release(self) -> None:
        if self.slots is not None and not self._released:
            self._released = True
            self.slots.free(self.slot)

    def extend(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert self.slots is not None and k.shape[0] == 1
        end = self.length + k.shape[2]
        own_k, own_v = self.slots.slot_views(self.slot, i)  # (nh, context, hs) each
        own_k[:, self.length : end] = k[0]
        own_v[:, self.length : end] = v[0]
        return own_k[None, :, :end], own_v[None, :, :end]


def truncate_all(cuts: list[tuple[BranchCache, int]]) -> None:
    """Truncate each cache to its length; the slot caches of one pool are zeroed past their
    new lengths together (see :meth:`KVSlots.clear`)."""
    pools: dict[int, tuple[KVSlots, list[tuple[int, int, int]]]] = {}
    for cache, length in cuts:
        old = cache.length
        BranchCache.truncate(cache, length)
        if isinstance(cache, SlotCache) and cache.slots is not None:
            pools.setdefault(id(cache.slots), (cache.slots, []))[1].append(
                (cache.slot, length, old)
            )
    for pool, pool_cuts in pools.values():
        pool.clear(pool_cuts)


class UniformKV:
    """Keys and values for a batch whose rows all sit at the same positions (training, and
    in-process decoding), with an optional cache."""

    def __init__(self, cache: BranchCache | None) -> None:
        self.cache = cache

    def positions(self, steps: int, device: torch.device) -> Tensor:
        """Absolute positions of the new rows, ``(1, T)``: they follow the cached ones."""
        start = 0 if self.cache is None else self.cache.length
        return torch.arange(start, start + steps, device=device)[None]

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """``k``/``v`` may hold fewer heads than ``q`` (grouped-query attention): the cache
        stores only those, and each is shared by ``q_heads / kv_heads`` query heads."""
        if self.cache is not None:
            k, v = self.cache.extend(i, k, v)  # (B, nh_kv, L+T, hs)
        gqa = _grouped(q, k)
        t, offset = q.shape[2], k.shape[2] - q.shape[2]
        if offset == 0:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa
            )
        if t == 1:  # one query at the newest position (a decode step): it sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        # Query i sits at absolute position offset + i and sees keys 0..offset + i.
        rows = torch.arange(t, device=q.device)[:, None] + offset
        allowed = torch.arange(offset + t, device=q.device)[None, :] <= rows  # (T, L+T)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, enable_gqa=gqa
        )


def _grouped(q: Tensor, k: Tensor) -> bool:
    """Whether keys are shared by groups of query heads (``enable_gqa``); False, the default,
    where the counts are equal keeps the kernel every trained model runs."""
    return q.shape[1] != k.shape[1]


class RaggedKV:
    """Keys and values for a padded batch of sessions, each with its own cache and length.

    Row s holds ``lengths[s]`` new positions (the rest is padding) that follow the
    ``caches[s].length`` cached ones; each session's cache is extended with its real rows only.
    """

    def __init__(
        self, caches: Sequence[BranchCache], lengths: list[int], device: torch.device
    ) -> None:
        self.caches, self.lengths = caches, lengths
        cached = [c.length for c in caches]
        t_max = max(lengths)
        self.key_count = max(c + t for c, t in zip(cached, lengths, strict=True))
        starts = self.starts = torch.tensor(cached, device=device)
        keys = torch.arange(self.key_count, device=device)  # (S,)
        if t_max == 1:  # decode steps: the one query of a session sees its keys up to its own
            self.mask = (keys[None, :] <= starts[:, None])[:, None, None]  # (B, 1, 1, S)
        else:
            ends = starts + torch.tensor(lengths, device=device)
            query_pos = starts[:, None] + torch.arange(t_max, device=device)[None, :]  # (B, T)
            # A padded query row still sees key 0, so no row is fully masked (no NaN).
            self.mask = (keys[None, None, :] <= query_pos[:, :, None]) & (
                keys[None, None, :] < ends[:, None, None]
            )
            self.mask = self.mask[:, None]  # (B, 1, T, S)
        # Caches in one slot pool: where each real row's key goes, and which slots to read.
        self.slots: KVSlots | None = None
        pools = {id(c.slots) for c in caches if isinstance(c, SlotCache)}
        if len(pools) == 1 and all(isinstance(c, SlotCache) for c in caches):
            self.slots = caches[0].slots  # type: ignore[attr-defined]
            self.slot_index = torch.tensor([c.slot for c in caches], device=device)  # type: ignore[attr-defined]
            self.row_slot, self.row_position = self.slot_index, starts
            if t_max > 1:  # each real row: its session, its offset in the step, its position
                t = torch.tensor(lengths, device=device)
                session = torch.repeat_interleave(torch.arange(len(caches), device=device), t)
                first_row = torch.cumsum(t, 0) - t  # each session's first row in the packing
                offset = torch.arange(int(t.sum()), device=device) - first_row[session]
                self.rows = (session, offset)
                self.row_slot = self.slot_index[session]
                self.row_position = starts[session] + offset

    def positions(self, steps: int, device: torch.device) -> Tensor:
        """Absolute positions of each session's new rows, ``(B, T)`` (padding rows included:
        they are computed and thrown away)."""
        return self.starts.to(device)[:, None] + torch.arange(steps, device=device)[None, :]

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        if self.slots is not None:
            return self._attend_slots(i, q, k, v, dropout)
        ks, vs = [], []
        for s, (cache, t) in enumerate(zip(self.caches, self.lengths, strict=True)):
            k_s, v_s = cache.extend(i, k[s : s + 1, :, :t], v[s : s + 1, :, :t])
            ks.append(k_s[0].transpose(0, 1))  # (L_s+T_s, nh, hs)
            vs.append(v_s[0].transpose(0, 1))
        k_pad = pad_sequence(ks, batch_first=True).permute(0, 2, 1, 3)  # (B, nh, S, hs)
        v_pad = pad_sequence(vs, batch_first=True).permute(0, 2, 1, 3)
        return F.scaled_dot_product_attention(
            q, k_pad, v_pad, attn_mask=self.mask, dropout_p=dropout, enable_gqa=_grouped(q, k_pad)
        )

    def _attend_slots(self, i: int, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """One write and one read per keys and values, whatever the number of sessions."""
        assert self.slots is not None
        buf_k, buf_v = self.slots.keys[i], self.slots.values[i]
        if q.shape[2] == 1:  # decode steps: every row is real
            new_k, new_v = k[:, :, 0], v[:, :, 0]  # (B, nh, hs)
        else:
            session, offset = self.rows
            new_k, new_v = k[session, :, offset], v[session, :, offset]  # (N, nh, hs)
        buf_k[self.row_slot, :, self.row_position] = new_k
        buf_v[self.row_slot, :, self.row_position] = new_v
        n = self.key_count
        k_all = buf_k[:, :, :n].index_select(0, self.slot_index)  # (B, nh, S, hs)
        v_all = buf_v[:, :, :n].index_select(0, self.slot_index)
        return F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=self.mask, dropout_p=dropout, enable_gqa=_grouped(q, k_all)
        )


KVView = UniformKV | RaggedKV
