"""Admission of images into the pipeline: a total limit, fair and bounded waiting. (The per-stream limit is
the streaming servicer's: it stops reading a stream's images while `--max-images-in-flight` of them run.)

An image waits for a slot (at most `wait_seconds`, and at most `max_waiting` images wait at all), so a
burst of streams does not reach the VLM's queue all at once; beyond that bound it is refused with
RESOURCE_EXHAUSTED before any work starts. A freed slot goes to a waiting interactive image before a batch
one (serving.priority: with aging, so batch images still get at least one slot in every `batch_aging + 1`);
within a class, to the image whose stream has the fewest images in work (ties: the earliest waiter), so one
busy stream cannot starve the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

from serving import metrics, tracing
from serving.errors import Overloaded
from serving.priority import INTERACTIVE, PRIORITIES, PriorityOrder


@dataclass(eq=False)
class StreamShare:
    """One client stream's (or unary call's) view of the admission: how many of its images are in work."""

    running: int = 0


@dataclass(eq=False)
class _Waiter:
    share: StreamShare
    order: int
    priority: str
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    def __init__(self, total: int, max_waiting: int, wait_seconds: float, order: PriorityOrder | None = None):
        if total < 1 or max_waiting < 0 or wait_seconds < 0:
            raise ValueError("admission limits must be positive")
        self.total = total
        self.max_waiting = max_waiting
        self.wait_seconds = wait_seconds
        self.running = 0
        self._waiters: list[_Waiter] = []
        self._order = itertools.count()
        self._priority = order or PriorityOrder()
        for priority in PRIORITIES:  # both series exist from the start (at 0)
            metrics.QUEUE_WAIT.labels(stage="orchestrator", priority=priority)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, share: StreamShare, priority: str = INTERACTIVE):
        """Holds one image slot of `share` for the block; raises Overloaded when none comes in time."""
        started = time.perf_counter()
        with tracing.span("orchestrator.admission_wait", **{"i2s.priority": priority}):
            await self._acquire(share, priority)
        metrics.QUEUE_WAIT.labels(stage="orchestrator", priority=priority).observe(time.perf_counter() - started)
        try:
            yield
        finally:
            self._release(share)

    def _grant(self, share: StreamShare) -> None:
        self.running += 1
        share.running += 1

    async def _acquire(self, share: StreamShare, priority: str) -> None:
        waiter = _Waiter(share, next(self._order), priority)
        self._waiters.append(waiter)
        self._dispatch()  # a free slot is taken at once, unless a waiter with a better claim fits it
        if waiter.future.done():
            return
        if len(self._waiters) > self.max_waiting:
            self._waiters.remove(waiter)
            raise Overloaded(f"orchestrator busy: {self.running} images in work and {self.max_waiting} waiting; "
                             "retry later")
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_seconds)
        except BaseException as exc:
            if waiter.future.done():  # granted in the same moment the wait ended: give the slot back
                self._release(share)
            else:
                self._waiters.remove(waiter)
                waiter.future.cancel()
            if isinstance(exc, TimeoutError):
                raise Overloaded(f"orchestrator busy: no image slot within {self.wait_seconds:g} s; "
                                 "retry later") from None
            raise

    def _release(self, share: StreamShare) -> None:
        self.running -= 1
        share.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Slots to waiters while any fits: by priority (with aging), then the stream with fewest images in
        work, then the earliest."""
        while self.running < self.total:
            eligible = [w for w in self._waiters if not w.future.done()]
            if not eligible:
                return
            chosen = self._priority.pick(eligible, lambda w: w.priority, rank=lambda w: (w.share.running, w.order))
            self._waiters.remove(chosen)
            self._grant(chosen.share)
            chosen.future.set_result(None)

