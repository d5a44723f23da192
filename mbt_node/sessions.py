"""Per-session KV caches of the branches a node serves, with position checks and limits.

A cache belongs to one (session, layer, branch). Positions must arrive contiguously: a step
that starts past the cache's length is refused with FAILED_PRECONDITION and that length, so
the caller can replay what the node missed; a step that starts before it rolls the cache back
and recomputes. Idle sessions expire; session and token limits refuse with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from mbt_core.branch import BranchCache, truncate_all
from mbt_core.discovery import CACHE_LENGTH_METADATA
from mbt_node.config import NodeLimits
from mbt_node.status import StatusError

BranchKey = tuple[int, int]  # (layer, branch)


class Step(NamedTuple):  # a tuple: built for every step of every call
    session_id: str
    start: int
    length: int


@dataclass
class _Entry:
    cache: BranchCache
    last_used: float
    reserved: int = 0  # positions counted against the limit: the end of its last reservation


class SessionStore:
    """Thread-safe: the batch executor reserves and extends, the servicer ends sessions."""

    def __init__(
        self,
        limits: NodeLimits,
        context_length: int,
        new_cache: Callable[[BranchKey], BranchCache],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._context = context_length
        self._new_cache = new_cache
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, BranchKey], _Entry] = {}
        self._sessions: dict[str, set[BranchKey]] = {}  # session id -> the keys of its caches
        self._reserved = 0  # sum of the entries' reserved positions: no scan per call
        self._last_sweep = clock()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def cached_tokens(self) -> int:
        with self._lock:
            return sum(e.cache.length for e in self._entries.values())

    def length(self, session_id: str, key: BranchKey) -> int:
        entry = self._entries.get((session_id, key))
        return 0 if entry is None else entry.cache.length

    def reserve(self, key: BranchKey, steps: list[Step]) -> list[BranchCache]:
        """Check every step first, then roll back caches that start early; all or nothing."""
        with self._lock:
            self._sweep()
            now = self._clock()
            found = [self._entries.get((s.session_id, key)) for s in steps]
            new_sessions = sum(1 for s in steps if s.session_id not in self._sessions)
            if new_sessions and len(self._sessions) + new_sessions > self._limits.max_sessions:
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"node holds {len(self._sessions)} sessions, limit {self._limits.max_sessions}",
                )
            growth = 0
            for s, entry in zip(steps, found, strict=True):
                if s.start + s.length > self._context:
                    raise StatusError(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"session {s.session_id}: positions {s.start}..{s.start + s.length} "
                        f"exceed the context length {self._context}",
                    )
                current = 0 if entry is None else entry.cache.length
                if s.start > current:
                    raise StatusError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"session {s.session_id} layer {key[0]} branch {key[1]}: cache holds "
                        f"{current} positions, step starts at {s.start}; replay {current}.."
                        f"{s.start} first",
                        ((CACHE_LENGTH_METADATA, str(current)),),
                    )
                growth += s.start + s.length - (0 if entry is None else entry.reserved)
            if self._reserved + growth > self._limits.max_cached_tokens:
                raise StatusError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"node caches {self._reserved} positions, "
                    f"limit {self._limits.max_cached_tokens}",
                )
            caches, rollbacks = [], []
            for s, entry in zip(steps, found, strict=True):
                if entry is None:
                    entry = _Entry(self._new_cache(key), now)
                    self._entries[(s.session_id, key)] = entry
                    self._sessions.setdefault(s.session_id, set()).add(key)
                elif s.start < entry.cache.length:
                    rollbacks.append((entry.cache, s.start))  # recompute from there
                entry.last_used = now
                self._reserved += s.start + s.length - entry.reserved
                entry.reserved = s.start + s.length
                caches.append(entry.cache)
            if rollbacks:
                truncate_all(rollbacks)
            return caches

    def end(self, session_id: str) -> int:
        """Release every cache of a session; returns how many there were."""
        with self._lock:
            keys = list(self._sessions.get(session_id, ()))
            for key in keys:
                self._drop((session_id, key))
            return len(keys)

    def _drop(self, k: tuple[str, BranchKey]) -> None:
        entry = self._entries.pop(k, None)
        if entry is None:
            return
        entry.cache.release()
        self._reserved -= entry.reserved
        keys = self._sessions[k[0]]
        keys.discard(k[1])
        if not keys:
            del self._sessions[k[0]]

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        stale = [
            k for k, e in self._entries.items() if now - e.last_used > self._limits.session_ttl_s
        ]
        for k in stale:
            self._drop(k)
