"""One stream pump: producers (tasks on the event loop, or a thread) feed one queue that one consumer reads.

    async with Pump(maxsize=64) as pump:
        pump.spawn(produce(pump))      # a producer task; it may spawn more
        async for item in pump:        # ends when the last producer ends; a producer's error is raised here
            ...

- `await pump.put(item)` waits while `maxsize` items are queued (backpressure: a slow consumer slows the
  producers); `put_nowait` is for unbounded pumps; `put_threadsafe` hands an item over from another thread.
- The stream ends once every spawned producer has ended, after the items they queued. A producer that
  raises ends it with that error, raised in the consumer after the items queued before it.
- A pump with no spawned producer (items only from a thread) ends when its consumer stops reading.
- Leaving the `async with` block (the stream's end, a break, an error, cancellation) cancels the producers
  still running and waits for them.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Generic, TypeVar

T = TypeVar("T")


class Pump(Generic[T]):
    def __init__(self, maxsize: int = 0):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue(maxsize)
        self._producers: set[asyncio.Future] = set()
        self._error: BaseException | None = None
        self._ended = asyncio.Event()  # every producer ended, or one failed

    async def __aenter__(self) -> "Pump[T]":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.cancel()

    async def put(self, item: T) -> None:
        await self._queue.put(item)

    def put_nowait(self, item: T) -> None:
        self._queue.put_nowait(item)

    def put_threadsafe(self, item: T) -> bool:
        """From another thread (unbounded: a thread cannot wait on the loop). False once the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False

    def spawn(self, producer: Awaitable[Any]) -> asyncio.Future:
        """Runs `producer` (a coroutine, or a future such as `run_in_executor`'s) as one of the pump's."""
        future = asyncio.ensure_future(producer)
        self._producers.add(future)
        future.add_done_callback(self._producer_ended)
        return future

    def _producer_ended(self, future: asyncio.Future) -> None:
        self._producers.discard(future)
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()
            self._ended.set()
        if not self._producers:
            self._ended.set()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._consume()

    async def _consume(self) -> AsyncIterator[T]:
        while True:
            if not self._queue.empty():
                yield self._queue.get_nowait()
                continue
            if self._ended.is_set():
                if self._error is not None:
                    raise self._error
                return
            getter = asyncio.ensure_future(self._queue.get())
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    async def cancel(self) -> None:
        """Cancels the producers still running and waits for them (an executor's thread is not waited for)."""
        producers = list(self._producers)
        for producer in producers:
            producer.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
