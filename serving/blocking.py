"""Running blocking model code (a torch generate loop) from asyncio without blocking the event loop.

Each backend gets one worker thread: models are not thread-safe, and one call at a time on one device
is what we want anyway. Cancellation flows the other way: when the consumer goes away, `should_stop`
turns true and the model loop can end early instead of burning GPU time for nobody.
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


class ModelWorker:
    """One thread that owns a model; at most `max_queue` callers wait for it (else Overloaded)."""

    def __init__(self, name: str, max_queue: int = 16):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._max_queue = max_queue
        self._waiting = 0
        # The first generate() on a new thread runs ~3x slower for the whole call (docs/architecture.md
        # "One model thread"): load, warm-up and every request go through this one thread, whose identity
        # tests can check.
        self.thread_ident: int | None = None

    def _mark(self) -> None:
        self.thread_ident = threading.get_ident()

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """Runs `fn(*args)` on the worker's thread, for callers without an event loop (a backend's own
        jobs and decode loop); returns its concurrent Future."""
        return self._executor.submit(lambda: (self._mark(), fn(*args))[1])

    def run(self, fn: Callable[..., T], *args) -> T:
        """Runs the blocking `fn(*args)` on the worker's thread and waits for it, from any thread.

        Called on the worker's own thread (a backend method calling another), it runs inline instead of
        queueing behind itself. For backends that own their thread, so every caller (the batcher, a
        loader in `asyncio.to_thread`, a test) lands on the same one. The caller's context variables (the
        batch's trace phases) go along.
        """
        if threading.get_ident() == self.thread_ident:
            return fn(*args)
        return self.submit(contextvars.copy_context().run, fn, *args).result()

    async def stream(self, make_iter: Callable[[Callable[[], bool]], Iterator[T]]) -> AsyncIterator[T]:
        """Yields the items of the blocking iterator `make_iter(should_stop)` as the thread produces them."""
        if self._waiting >= self._max_queue:
            raise Overloaded(f"{self._waiting} requests already waiting; retry later")
        stop = threading.Event()
        self._waiting += 1
        try:
            async with Pump() as pump:

                def produce() -> None:  # the thread; its error ends the pump's stream
                    self._mark()
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
            self._waiting -= 1
            stop.set()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
