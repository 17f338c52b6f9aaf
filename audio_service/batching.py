"""Micro-batching for the audio backend: concurrent requests with compatible settings share one model call.

    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=10, max_queue=64)
    result = await batcher.submit(request, on_step=lambda done, total: ...)

- Requests with equal `backend.batch_key(request)` (duration or its bucket, steps, guidance, scheduler,
  candidates), from any image or client, go into one `backend.generate` call, up to `max_batch_size`
  (a full batch leaves at once). The oldest queued request waits at most `max_wait_ms` since it
  arrived for companions; requests that queued while a batch ran leave together right after it.
  Others wait for a later call.
- Which request a call is formed around: interactive before batch (`serving.priority.PriorityOrder`: aging
  gives batch requests at least one call in every `batch_aging + 1`), then the oldest; its companions are
  compatible requests, interactive ones first. A running call is never preempted.
- One dispatch thread calls the backend: one model, one call at a time. The event loop never blocks.
- At most `max_queue` requests wait (the running batch not counted); beyond that `submit` raises
  `Overloaded` (RESOURCE_EXHAUSTED).
- A caller that is cancelled while queued is dropped: its request never runs. So is a request whose
  deadline (`serving.deadline.Deadline`) passes while it waits: its caller gets DeadlineExceeded at once. If every caller of the
  running batch is cancelled, the backend's `should_stop` turns true and the loop ends at the next step.
- `on_step(done, total)` progress reaches each caller on the event loop (call_soon_threadsafe).
- A window of a long clip (`window=`, audio_service/long_clips.py) batches with windows of other clips
  (same settings), never with plain clips: the backend then gets `windows=` for the whole call.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from audio_service.backend import AudioBackend, AudioRequest, AudioResult, BackendCancelled, StepCallback, Window
from serving import metrics, tracing
from serving.deadline import Deadline
from serving.errors import DeadlineExceeded, NotReady, Overloaded
from serving.priority import BATCH, INTERACTIVE, PRIORITIES, PriorityOrder

__all__ = ["Batcher", "NotReady", "Overloaded"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request: AudioRequest
    future: asyncio.Future
    on_step: StepCallback | None
    key: tuple
    queued_at: float
    cancelled: bool = False  # written on the loop, read by the worker thread (a plain bool: atomic)
    trace: Any = None  # the caller's trace context (tracing.capture()), None when tracing is off
    queued_ns: int = 0
    deadline: Deadline | None = None
    priority: str = INTERACTIVE
    window: Window | None = None

    def expired(self) -> bool:
        return self.deadline is not None and self.deadline.expired()


class Batcher:
    """Groups concurrently submitted requests into backend calls (see the module docstring)."""

    def __init__(
        self,
        backend: AudioBackend,
        *,
        max_batch_size: int = 4,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        order: PriorityOrder | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.backend = backend
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.order = order or PriorityOrder()
        for priority in PRIORITIES:  # every series exists from the start (at 0)
            metrics.QUEUE_WAIT.labels(stage="audio", priority=priority)
        for state in ("queued", "running"):
            metrics.WORK_CANCELLED.labels(stage="audio", state=state)
        # Counters and the last event only: per-batch history would grow for the life of the server
        # (the i2s_* metrics count batches for operators).
        self.backend_calls = 0  # number of backend.generate calls made
        self.requests_batched = 0  # requests in those calls
        self.last_batch_size = 0
        self.last_stopped_early: tuple[int, int | None] | None = None  # (steps run, asked) of the last batch everyone left
        self._idle: asyncio.Event | None = None  # set whenever no batch runs
        self._queue: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-backend")
        self._running: list[_Job] | None = None
        self._closed = False
        self._stop_running = False

    # -- public ------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a backend call (not counting the running batch)."""
        return len(self._queue)

    async def submit(self, request: AudioRequest, on_step: StepCallback | None = None,
                     deadline: Deadline | None = None, priority: str = INTERACTIVE,
                     window: Window | None = None) -> AudioResult:
        """Queues one request and returns its result when its batch is done.

        `request` is valid by construction (i2s_formats.contract). Raises Overloaded when `max_queue`
        requests already wait, NotReady after `close()`, DeadlineExceeded when `deadline` passes first (a
        request still queued then never runs), and whatever the backend raised for its batch.
        """
        if self._closed:
            raise NotReady("the audio batcher is closed")
        if deadline is not None and deadline.expired():
            raise DeadlineExceeded("deadline exceeded before the audio request was queued")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} audio requests already waiting; retry later")
        loop = asyncio.get_running_loop()
        self._start(loop)
        key = self.backend.batch_key(request)
        if window is not None:
            key = key + ("window", window.overlap_frames)
        job = _Job(request=request, future=loop.create_future(), on_step=on_step, key=key, queued_at=loop.time(),
                   trace=tracing.capture(), queued_ns=time.time_ns(), deadline=deadline, priority=priority,
                   window=window)
        self._queue.append(job)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), deadline.remaining() if deadline else None)
        except TimeoutError:
            self._leave(job)
            raise DeadlineExceeded("deadline exceeded while the audio request waited or ran") from None
        except asyncio.CancelledError:
            self._leave(job)
            raise

    def _leave(self, job: _Job) -> None:
        job.cancelled = True
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it any more
        try:
            self._queue.remove(job)  # still queued: it will never run
            metrics.WORK_CANCELLED.labels(stage="audio", state="queued").inc()
        except ValueError:  # already taken into a batch: should_stop sees the flag
            if not job.future.done():
                metrics.WORK_CANCELLED.labels(stage="audio", state="running").inc()

    async def close(self, *, cancel_running: bool = False) -> None:
        """Stops accepting requests and fails the queued ones with NotReady.

        The running batch finishes (or, with `cancel_running`, stops at its next step), then the worker
        thread ends. Idempotent.
        """
        self._closed = True
        self._stop_running = cancel_running
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(NotReady("the audio service is shutting down"))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._dispatcher is not None:
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
            self._dispatcher = None
        self._executor.shutdown(wait=False)

    # -- dispatcher --------------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._dispatcher is None or self._dispatcher.done() or self._dispatcher.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch(), name="audio-batcher")

    def _drop_expired(self) -> None:
        """Fails queued requests whose deadline passed (their callers' timers may not have fired yet)."""
        for job in [job for job in self._queue if job.expired()]:
            self._queue.remove(job)
            job.cancelled = True
            if not job.future.done():
                job.future.set_exception(DeadlineExceeded("deadline exceeded while the audio request waited"))

    def _compatible(self, head: _Job) -> list[_Job]:
        """`head` and the requests that can share its call, interactive ones first, each class oldest first."""
        others = [job for job in self._queue if job is not head and job.key == head.key and not job.cancelled]
        others.sort(key=lambda job: job.priority == BATCH)  # stable: arrival order within a class
        return [head, *others][: self.max_batch_size]

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self.order.choose(self._queue, _priority)
            deadline = head.queued_at + self.max_wait_s
            # Wait for companions until the batch is full or the head has waited long enough.
            while not self._closed and head in self._queue and len(self._compatible(head)) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if self._closed:
                break
            self._drop_expired()
            if head not in self._queue:  # the head's caller left while we waited: start over
                continue
            head = self.order.pick(self._queue, _priority)  # interactive work that came meanwhile goes first
            batch = self._compatible(head)
            for job in batch:
                self._queue.remove(job)
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        def should_stop() -> bool:
            return self._stop_running or all(job.cancelled for job in batch)

        def on_step(done: int, total: int) -> None:  # worker thread
            try:
                loop.call_soon_threadsafe(self._progress, batch, done, total)
            except RuntimeError:  # loop closed: nobody is listening
                pass

        self._running = batch
        if self._idle is not None:
            self._idle.clear()
        self.backend_calls += 1
        self.requests_batched += len(batch)
        self.last_batch_size = len(batch)
        metrics.AUDIO_BATCH_SIZE.observe(len(batch))
        call = functools.partial(
            self.backend.generate, [job.request for job in batch], should_stop=should_stop, on_step=on_step,
            deadline=Deadline.latest(job.deadline for job in batch),
        )
        if batch[0].window is not None:  # one key: all windows or none
            call = functools.partial(call, windows=[job.window for job in batch])
        # Each caller's trace gets its wait and, from the backend, the batch's stages (one span per caller).
        now_ns = time.time_ns()
        for job in batch:
            tracing.record_span(job.trace, "audio.batch_wait", job.queued_ns, now_ns, batch_size=len(batch))
            metrics.QUEUE_WAIT.labels(stage="audio", priority=job.priority).observe((now_ns - job.queued_ns) / 1e9)
        phases = tracing.Phases([job.trace for job in batch if job.trace is not None], batch_size=len(batch))
        call = tracing.run_with_phases(phases, call)
        started = loop.time()
        try:
            results: Sequence[AudioResult] = await loop.run_in_executor(self._executor, call)
            metrics.MODEL_SECONDS.labels(stage="audio").observe(loop.time() - started)
        except asyncio.CancelledError:  # the dispatcher itself is being torn down
            self._stop_running = True
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(NotReady("the audio batcher was stopped"))
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to the callers
            if isinstance(exc, BackendCancelled):
                self.last_stopped_early = (exc.steps_run, exc.total_steps)
                metrics.AUDIO_STOPPED_EARLY.inc()
            if not all(job.cancelled for job in batch):
                log.info("audio batch of %d failed: %s: %s", len(batch), type(exc).__name__, exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            if len(results) != len(batch):
                error = RuntimeError(f"backend returned {len(results)} results for {len(batch)} requests")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
            else:
                for job, result in zip(batch, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):  # this clip failed, its batch-mates did not
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
        finally:
            phases.end()
            self._running = None
            if self._idle is not None:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no batch is running (for tests and orderly shutdown)."""
        if self._idle is None:
            self._idle = asyncio.Event()
            if self._running is None:
                self._idle.set()
        await self._idle.wait()

    @staticmethod
    def _progress(batch: list[_Job], done: int, total: int) -> None:
        for job in batch:
            if job.on_step is not None and not job.cancelled and not job.future.done():
                try:
                    job.on_step(done, total)
                except Exception:  # noqa: BLE001 - a caller's callback must not break the others
                    log.exception("on_step callback failed")


def _priority(job: _Job) -> str:
    return job.priority
