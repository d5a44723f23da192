"""A generation's session on the nodes: its id and secret, its layer inputs, and its lifetime.

A session is opened through :class:`SessionSlots`, which keeps this gateway within every
node's per-caller session quota (a generation beyond it waits for a slot instead of being
refused by a node), and ended through :class:`Ender`, which releases its caches on every node
that took part and retries a node that did not answer (paused, partitioned) until it does or
the node's own idle expiry has long taken over, so that no session is left behind.

Every session carries a random secret: nodes bind the session to it (and to the gateway's
certificate under TLS), so nobody who learns a session id can write into, roll back or end
it. Neither the id nor the secret is ever logged.

A session's step on its way through the layers is a :class:`LayerPass`: its hidden state, and
its logits once the trunk's head ran, are two fields.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from mbt_aggregator.mix import Mix
from mbt_aggregator.registry import Registry
from mbt_aggregator.reports import LayerReport

log = logging.getLogger("mbt_aggregator")
SECRET_BYTES = 16
END_TIMEOUT_S = 2.0
END_RETRY_S = 2.0
END_GIVE_UP_S = 600.0  # twice a node's default idle expiry: by then it has dropped the caches


class LayerInputs:
    """One layer's inputs of a session, position by position, kept for replays: a buffer that
    doubles, so that a token's step writes one row instead of copying all of them."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self.length = 0

    def record(self, start: int, h: Tensor) -> None:
        """Positions ``start..start+T`` are ``h`` (T, C); later ones are forgotten."""
        if not 0 <= start <= self.length:
            raise ValueError(f"inputs start at {start}, but {self.length} positions are kept")
        end = start + h.shape[0]
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < end or buffer.dtype != h.dtype:
            grown = h.new_empty((max(end, 16, 2 * self.length), h.shape[1]))
            if buffer is not None:
                grown[:start] = buffer[:start]
            self._buffer = buffer = grown
        buffer[start:end] = h
        self.length = end

    def __getitem__(self, positions: slice) -> Tensor:
        if self._buffer is None:
            raise IndexError("no inputs recorded")
        return self._buffer[: self.length][positions]


@dataclass
class Session:
    """A generation as the nodes see it: an id and secret, every layer's inputs so far, and
    the nodes that took part."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(SECRET_BYTES), repr=False)
    history: dict[int, LayerInputs] = field(default_factory=dict)  # layer -> its inputs
    nodes: set[str] = field(default_factory=set)
    holds_slot: bool = False  # opened through SessionSlots: ending it frees the slot
    ended: bool = False  # set first when it ends: a late call then sends nothing more
    mix: Mix | None = None  # fuse with these weights (the drift probe); None: the current


@dataclass
class LayerPass:
    """One session's step on its way through the layers ``layer..last``: steps of concurrent
    sessions that wait at the same layer fan out together, and a layer's worker hands each
    step on to the next layer itself (no wake-up of the session's task between layers)."""

    session: Session
    start: int
    hidden: Tensor  # (T, C): the input of ``layer``; after ``last``, its output
    layer: int
    last: int
    head: bool  # end with the trunk's head: ``logits`` is set
    future: asyncio.Future[LayerPass]  # resolved with this pass, done or failed
    reports: list[LayerReport] = field(default_factory=list)
    logits: Tensor | None = None  # (T, V), once the head ran


class SessionSlots:
    """At most ``limit()`` sessions open at once (the smallest per-caller quota among the
    admitted nodes); :meth:`acquire` waits for a free slot. The limit is read again every
    ``recheck_s``, so a node that joins with a smaller (or larger) quota counts at once."""

    def __init__(self, limit: Callable[[], int], recheck_s: float = 0.1) -> None:
        self._limit = limit
        self._recheck_s = recheck_s
        self._freed = asyncio.Event()
        self.open = 0

    async def acquire(self) -> None:
        while self.open >= self._limit():
            self._freed.clear()
            try:
                async with asyncio.timeout(self._recheck_s):
                    await self._freed.wait()
            except TimeoutError:
                pass
        self.open += 1

    def release(self) -> None:
        self.open -= 1
        self._freed.set()


class Ender:
    """Ends sessions on the nodes that took part; a node that does not answer (or has left the
    registry, and may come back: a paused node) is asked again every ``retry_s``, up to
    ``give_up_s``."""

    def __init__(
        self,
        registry: Registry,
        timeout_s: float = END_TIMEOUT_S,
        retry_s: float = END_RETRY_S,
        give_up_s: float = END_GIVE_UP_S,
    ) -> None:
        self._registry = registry
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._give_up_s = give_up_s
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Sessions whose end some node has not confirmed yet."""
        return len(self._retries)

    async def end(self, session: Session) -> None:
        """One attempt on every node that took part; the ones that failed retry later."""
        nodes = sorted(session.nodes)
        results = await asyncio.gather(
            *(self._end_on(node_id, session) for node_id in nodes), return_exceptions=True
        )
        for node_id, result in zip(nodes, results, strict=True):
            if result is False or isinstance(result, BaseException):
                task = asyncio.get_running_loop().create_task(self._retry(node_id, session))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)

    async def _end_on(self, node_id: str, session: Session) -> bool:
        """True when the node confirmed the end (a restarted node holds nothing: also true)."""
        node = self._registry.get(node_id)
        if node is None:
            return False
        try:
            await node.client.end_session(session.session_id, session.secret, self._timeout_s)
        except Exception as exc:
            log.debug("ending a session on node %s failed: %s", node_id[:16], exc)
            return False
        return True

    async def _retry(self, node_id: str, session: Session) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._give_up_s
        while loop.time() < give_up:
            await asyncio.sleep(self._retry_s)
            if await self._end_on(node_id, session):
                return
        log.info("gave up ending a session on node %s (its idle expiry frees it)", node_id[:16])

    async def close(self) -> None:
        for task in self._retries:
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
