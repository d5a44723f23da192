"""Micro-batching: concurrent calls for one branch run as one ragged batched forward.

Calls queue per branch. A worker takes what is queued (up to ``max_batch_steps`` session
steps, optionally waiting ``max_wait_ms`` for more), checks and reserves every step's cache,
and runs all of them through one ``Branch.forward_ragged``: on the node's torch thread, or, for
a batch of few positions (decode steps), right on the event loop, where it costs less than the
thread hop. A call whose sessions already appear in the batch waits for the next one, so a
cache is never extended twice at once. A small call that finds its branch idle (nothing queued,
nothing running) runs at once, inside ``submit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mbt_core.model.blocks import Branch
from mbt_core.model.kv import BranchCache
from mbt_core.wire.contract import BranchKey, SessionStep
from mbt_node.config import BatchingConfig
from mbt_node.sessions import Caller, SessionStore


@dataclass
class BranchResult:
    outputs: Tensor  # (sum of step lengths, C), packed like the inputs
    compute_seconds: float
    batch_steps: int  # session steps in the batched forward that produced it


@dataclass
class _Job:
    steps: list[SessionStep]
    inputs: Tensor
    caller: Caller
    future: asyncio.Future[BranchResult]
    sessions: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = frozenset(s.session_id for s in self.steps)


class BranchBatcher:
    def __init__(
        self,
        key: BranchKey,
        branch: Branch,
        store: SessionStore,
        executor: ThreadPoolExecutor,
        cfg: BatchingConfig,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        """``observe(steps, seconds)`` is told every batched forward that succeeded."""
        self.key = key
        self._observe = observe
        self._branch = branch
        self._store = store
        self._executor = executor
        self._cfg = cfg
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._busy = False  # the worker holds a batch (it may be computing on the thread)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher{self.key}"
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def submit(
        self, steps: list[SessionStep], inputs: Tensor, caller: Caller
    ) -> BranchResult:
        if self._idle() and inputs.shape[0] <= self._cfg.direct_max_positions:
            # Nothing queued or running, a small step: run it now, without waking the worker
            # (the usual one-token decode step of a lone generation).
            return self._compute(steps, inputs, caller)
        future: asyncio.Future[BranchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(steps, inputs, caller, future))
        self._wakeup.set()
        return await future

    def _idle(self) -> bool:
        return not (self._queue or self._busy or self._cfg.max_wait_ms)

    async def _run(self) -> None:
        while True:
            self._busy = False
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._busy = True
            if self._cfg.max_wait_ms and len(self._queue) < self._cfg.max_batch_steps:
                await asyncio.sleep(self._cfg.max_wait_ms / 1000)
            batch = self._take()
            positions = sum(job.inputs.shape[0] for job in batch)
            try:
                if positions <= self._cfg.inline_max_positions:
                    results = self._execute(batch)
                else:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._execute, batch
                    )
            except asyncio.CancelledError:
                for job in batch:
                    job.future.cancel()
                raise
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue  # the caller went away
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _take(self) -> list[_Job]:
        """Queued jobs in order, up to the step bound, skipping sessions already taken."""
        batch: list[_Job] = []
        taken: set[str] = set()
        steps = 0
        deferred: deque[_Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.future.cancelled():
                continue
            if batch and (
                taken & job.sessions or steps + len(job.steps) > self._cfg.max_batch_steps
            ):
                deferred.append(job)
                continue
            batch.append(job)
            taken |= job.sessions
            steps += len(job.steps)
        self._queue.extendleft(reversed(deferred))
        return batch

    def _compute(self, steps: list[SessionStep], inputs: Tensor, caller: Caller) -> BranchResult:
        """One call's steps alone: reserve their caches, run them (a refusal raises)."""
        t0 = time.perf_counter()
        caches = self._store.reserve(self.key, steps, caller)
        try:
            with torch.inference_mode():
                out = self._branch.forward_ragged(inputs, caches, [s.length for s in steps])
        finally:
            self._store.finish(caches)
        result = BranchResult(out, time.perf_counter() - t0, len(steps))
        if self._observe is not None:
            self._observe(result.batch_steps, result.compute_seconds)
        return result

    def _execute(self, batch: list[_Job]) -> list[BranchResult | BaseException]:
        """On the torch thread: reserve caches, run one batched forward, split the outputs."""
        if len(batch) == 1:
            job = batch[0]
            try:
                return [self._compute(job.steps, job.inputs, job.caller)]
            except Exception as exc:
                return [exc]
        t0 = time.perf_counter()
        outcomes: list[BranchResult | BaseException | None] = [None] * len(batch)
        run: list[tuple[int, list[BranchCache]]] = []
        for i, job in enumerate(batch):
            try:
                run.append((i, self._store.reserve(self.key, job.steps, job.caller)))
            except Exception as exc:  # a refusal of this job only
                outcomes[i] = exc
        if run:
            jobs = [batch[i] for i, _ in run]
            caches = [c for _, cs in run for c in cs]
            lengths = [s.length for job in jobs for s in job.steps]
            try:
                with torch.inference_mode():
                    packed = torch.cat([job.inputs for job in jobs])
                    out = self._branch.forward_ragged(packed, caches, lengths)
            except Exception as exc:  # caches advance only after success: still valid
                for i, _ in run:
                    outcomes[i] = exc
            else:
                elapsed = time.perf_counter() - t0
                if self._observe is not None:
                    self._observe(len(lengths), elapsed)
                pieces = out.split([job.inputs.shape[0] for job in jobs])
                for (i, _), piece in zip(run, pieces, strict=True):
                    outcomes[i] = BranchResult(piece, elapsed, len(lengths))
            finally:
                self._store.finish(caches)
        return [o for o in outcomes if o is not None]
