"""Per-session KV caches of the branches a node serves: positions, owners, quotas, limits.

A cache belongs to one (session, layer, branch). Positions must arrive contiguously: a step
that starts past the cache's length is refused (:class:`CacheBehind`, with that length) so the
caller can replay what the node missed; a step that starts before it rolls the cache back and
recomputes.

A session belongs to the caller that opened it: the certificate it called with (under TLS) and
the secret its first step carried. Steps and ends from anyone else are refused
(:class:`NotSessionOwner`), and an ended session stays closed for a while, so that a late step
cannot open it again. Every caller has quotas of sessions and cached positions; when the node
as a whole is full, an authenticated caller (a gateway's certificate) takes the room of the
least recently used sessions of anonymous callers (plaintext, keyed by host), never the other
way round. Idle sessions expire. Refusals never name a session id.
"""

from __future__ import annotations

import collections
import hmac
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from mbt_core.errors import (
    CacheBehind,
    LimitExceeded,
    NotSessionOwner,
    OutOfContext,
    SessionEnded,
)
from mbt_core.model.kv import BranchCache, truncate_all
from mbt_core.wire.contract import BranchKey, SessionStep
from mbt_node.config import NodeLimits

MIN_SECRET_BYTES, MAX_SECRET_BYTES = 16, 64
ENDED_KEPT_S = 120.0  # an ended session refuses late steps this long


class Caller(NamedTuple):
    """Who calls: ``cert:<fingerprint>`` under TLS (authenticated), else ``host:<address>``."""

    id: str
    authenticated: bool


@dataclass
class _Entry:
    cache: BranchCache
    reserved: int = 0  # positions counted against the limits: the end of its last reservation
    busy: int = 0  # forwards that hold the cache now
    dropped: bool = False  # its session went: release the cache once no forward holds it


@dataclass
class _Session:
    caller: Caller
    secret: bytes
    last_used: float
    entries: dict[BranchKey, _Entry] = field(default_factory=dict)
    reserved: int = 0  # the sum of its entries'


@dataclass
class _Usage:
    sessions: int = 0
    reserved: int = 0


class SessionStore:
    """Thread-safe: batchers reserve and finish on the torch thread or the event loop, the
    servicer ends sessions. ``counts`` tallies refusals and evictions for the metrics."""

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
        self._sessions: dict[str, _Session] = {}
        self._usage: dict[str, _Usage] = {}  # caller id -> what it holds
        self._ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._held: dict[int, _Entry] = {}  # id(cache) -> its entry, while a forward holds it
        self._reserved = 0  # sum of every session's reserved positions: no scan per call
        self._last_sweep = clock()
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def cached_tokens(self) -> int:
        """Positions reserved over all sessions and branches (what the token limits count)."""
        return self._reserved

    def length(self, session_id: str, key: BranchKey) -> int:
        session = self._sessions.get(session_id)
        entry = None if session is None else session.entries.get(key)
        return 0 if entry is None else entry.cache.length

    def reserve(
        self, key: BranchKey, steps: list[SessionStep], caller: Caller
    ) -> list[BranchCache]:
        """Check every step first, then roll back caches that start early; all or nothing.
        Each returned cache is held until :meth:`finish` is called with it."""
        with self._lock:
            self._sweep()
            now = self._clock()
            found = [self._sessions.get(s.session_id) for s in steps]
            new = 0
            for i, (s, session) in enumerate(zip(steps, found, strict=True)):
                if session is None:
                    if s.session_id in self._ended:
                        raise SessionEnded(f"step {i}: the session was ended; open a new one")
                    new += 1
                elif session.caller.id != caller.id or not hmac.compare_digest(
                    session.secret, s.secret
                ):
                    self.counts["not_owner"] += 1
                    raise NotSessionOwner(f"step {i}: the session belongs to another caller")
            growth = 0
            for i, (s, session) in enumerate(zip(steps, found, strict=True)):
                entry = None if session is None else session.entries.get(key)
                if s.start + s.length > self._context:
                    raise OutOfContext(
                        f"step {i}: positions {s.start}..{s.start + s.length} exceed the "
                        f"context length {self._context}"
                    )
                current = 0 if entry is None else entry.cache.length
                if s.start > current:
                    raise CacheBehind(
                        f"step {i}: layer {key[0]} branch {key[1]} holds {current} positions, "
                        f"the step starts at {s.start}; replay {current}..{s.start} first",
                        current,
                    )
                growth += s.start + s.length - (0 if entry is None else entry.reserved)
            self._check_quotas(caller, new, growth, {s.session_id for s in steps})
            caches, rollbacks = [], []
            for s, session in zip(steps, found, strict=True):
                if session is None:
                    session = self._open(s, caller, now)
                entry = session.entries.get(key)
                if entry is None:
                    entry = session.entries[key] = _Entry(self._new_cache(key))
                elif s.start < entry.cache.length:
                    rollbacks.append((entry.cache, s.start))  # recompute from there
                session.last_used = now
                delta = s.start + s.length - entry.reserved
                entry.reserved += delta
                session.reserved += delta
                self._usage[caller.id].reserved += delta
                self._reserved += delta
                entry.busy += 1
                self._held[id(entry.cache)] = entry
                caches.append(entry.cache)
            if rollbacks:
                truncate_all(rollbacks)
            return caches

    def finish(self, caches: Iterable[BranchCache]) -> None:
        """The forward that reserved ``caches`` is done with them: a cache whose session went
        meanwhile (ended, evicted, expired) is released only now, so that its slot is never
        handed to another session while a forward still writes into it."""
        with self._lock:
            for cache in caches:
                entry = self._held.get(id(cache))
                if entry is None:
                    continue
                entry.busy -= 1
                if entry.busy <= 0:
                    del self._held[id(cache)]
                    if entry.dropped:
                        entry.cache.release()

    def end(self, session_id: str, secret: bytes, caller: Caller) -> int:
        """Release every cache of a session (its owner only); returns how many there were.
        An unknown or already ended session releases nothing (ending is idempotent)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                # Remembered all the same: a late Forward of it (sent before, queued behind a
                # pause) must not open it again after its end.
                self._remember_ended(session_id)
                return 0
            if session.caller.id != caller.id or not hmac.compare_digest(session.secret, secret):
                self.counts["not_owner"] += 1
                raise NotSessionOwner("the session belongs to another caller")
            released = len(session.entries)
            self._drop(session_id)
            self._remember_ended(session_id)
            return released

    # -- bookkeeping under the lock ------------------------------------------------------------

    def _open(self, step: SessionStep, caller: Caller, now: float) -> _Session:
        session = self._sessions[step.session_id] = _Session(caller, step.secret, now)
        usage = self._usage.get(caller.id)
        if usage is None:
            usage = self._usage[caller.id] = _Usage()
        usage.sessions += 1
        return session

    def _check_quotas(self, caller: Caller, new: int, growth: int, taking: set[str]) -> None:
        """The caller's quotas, then the node's limits (making room from anonymous callers'
        idle sessions for an authenticated caller); a refusal names the limit."""
        lim = self._limits
        usage = self._usage.get(caller.id) or _Usage()
        if new and usage.sessions + new > lim.max_sessions_per_caller:
            self._refuse(
                "max_sessions_per_caller",
                f"this caller holds {usage.sessions} sessions, its quota is "
                f"{lim.max_sessions_per_caller}",
            )
        if growth > 0 and usage.reserved + growth > lim.max_cached_tokens_per_caller:
            self._refuse(
                "max_cached_tokens_per_caller",
                f"this caller has {usage.reserved} positions cached, its quota is "
                f"{lim.max_cached_tokens_per_caller}",
            )
        over_sessions = len(self._sessions) + new - lim.max_sessions
        over_tokens = self._reserved + growth - lim.max_cached_tokens
        if (over_sessions > 0 or over_tokens > 0) and caller.authenticated:
            self._evict(over_sessions, over_tokens, taking)
        if new and len(self._sessions) + new > lim.max_sessions:
            self._refuse(
                "max_sessions",
                f"node holds {len(self._sessions)} sessions, its limit is {lim.max_sessions}",
            )
        if growth > 0 and self._reserved + growth > lim.max_cached_tokens:
            self._refuse(
                "max_cached_tokens",
                f"node caches {self._reserved} positions, its limit is {lim.max_cached_tokens}",
            )

    def _refuse(self, limit: str, why: str) -> None:
        self.counts[f"refused:{limit}"] += 1
        raise LimitExceeded(f"{why} (--{limit.replace('_', '-')})", limit)

    def _evict(self, sessions: int, tokens: int, taking: set[str]) -> None:
        """Drop anonymous callers' sessions, least recently used first, until ``sessions``
        sessions and ``tokens`` positions are free (or none is left to drop)."""
        candidates = sorted(
            (s.last_used, sid)
            for sid, s in self._sessions.items()
            if not s.caller.authenticated and sid not in taking
        )
        for _, sid in candidates:
            if sessions <= 0 and tokens <= 0:
                return
            tokens -= self._sessions[sid].reserved
            sessions -= 1
            self._drop(sid)
            self.counts["evicted"] += 1

    def _drop(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        for entry in session.entries.values():
            if entry.busy > 0:  # a forward still writes into it: released when it finishes
                entry.dropped = True
            else:
                entry.cache.release()
        usage = self._usage[session.caller.id]
        usage.sessions -= 1
        usage.reserved -= session.reserved
        if usage.sessions == 0:
            del self._usage[session.caller.id]
        self._reserved -= session.reserved

    def _remember_ended(self, session_id: str) -> None:
        self._ended[session_id] = self._clock()
        self._ended.move_to_end(session_id)
        while len(self._ended) > 4 * self._limits.max_sessions:
            self._ended.popitem(last=False)

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        ttl = self._limits.session_ttl_s
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > ttl]:
            self._drop(sid)
            self.counts["expired"] += 1
        while self._ended and now - next(iter(self._ended.values())) > ENDED_KEPT_S:
            self._ended.popitem(last=False)
