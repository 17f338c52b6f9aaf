"""Running blocking model code (a torch generate loop) from asyncio without blocking the event loop.

An in-process model gets one worker thread: models are not thread-safe, and one call at a time on one
device is what we want anyway. A backend that serves requests concurrently (a client of a Triton server
whose engine decodes them together) gets as many threads as it takes requests at once. Cancellation flows
the other way: when the consumer goes away, `should_stop` turns true and the model loop can end early
instead of burning GPU time for nobody.
"""
from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, TypeVar

from serving.errors import Overloaded
from serving.pump import Pump

T = TypeVar("T")


_thread = threading.local()  # .worker: the ModelWorker a thread belongs to


class ModelWorker:
    """`concurrency` threads (one for a model: the first generate() on a new thread runs ~3x slower for the
    whole call, docs/architecture.md "One model thread", so load, warm-up and every request go through the
    same one) that run a backend's blocking calls; at most `max_queue` callers wait for a free thread
    (else Overloaded)."""

    def __init__(self, name: str, max_queue: int = 16, concurrency: int = 1):
        if concurrency < 1:
            raise ValueError("a worker needs at least one thread")
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name,
                                            initializer=self._enter)
        self._max_queue = max_queue
        self._in_flight = 0

    def _enter(self) -> None:
        _thread.worker = self

    @property
    def queue_depth(self) -> int:
        """Streams waiting for a free thread (the queue-depth gauge of a service whose worker queues)."""
        return max(0, self._in_flight - self.concurrency)

    def on_thread(self) -> bool:
        """True on one of this worker's threads."""
        return getattr(_thread, "worker", None) is self

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """Runs `fn(*args)` on a worker thread, for callers without an event loop (a backend's own jobs
        and decode loop); returns its concurrent Future."""
        return self._executor.submit(fn, *args)

    def run(self, fn: Callable[..., T], *args) -> T:
        """Runs the blocking `fn(*args)` on the worker's thread and waits for it, from any thread.

        Called on the worker's own thread (a backend method calling another), it runs inline instead of
        queueing behind itself. For backends that own their thread, so every caller (the batcher, a
        loader in `asyncio.to_thread`, a test) lands on the same one. The caller's context variables (the
        batch's trace phases) go along.
        """
        if self.on_thread():
            return fn(*args)
        return self.submit(contextvars.copy_context().run, fn, *args).result()

    async def stream(self, make_iter: Callable[[Callable[[], bool]], Iterator[T]]) -> AsyncIterator[T]:
        """Yields the items of the blocking iterator `make_iter(should_stop)` as a thread produces them."""
        waiting = self._in_flight - self.concurrency
        if waiting >= self._max_queue:
            raise Overloaded(f"{waiting} requests already waiting; retry later")
        stop = threading.Event()
        self._in_flight += 1
        try:
            async with Pump() as pump:

                def produce() -> None:  # the thread; its error ends the pump's stream
                    if stop.is_set():  # the caller left while queued: never start
                        return
                    for item in make_iter(stop.is_set):
                        pump.put_threadsafe(item)
                        if stop.is_set():
                            break

                # Leaving cancels this future only: a long generation is not waited for, it sees `stop`
                # and ends on its own at the next step.
                pump.spawn(asyncio.get_running_loop().run_in_executor(self._executor, produce))
                async for item in pump:
                    yield item
        finally:
            self._in_flight -= 1
            stop.set()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
