"""serving/pump.py: the one producer/queue/consumer loop of the services (orchestrator image and stream events,
the model thread's items, audio progress, VLM deliveries)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from serving.pump import Pump

WAIT = 10.0


@pytest.mark.asyncio
async def test_items_of_every_producer_arrive_and_the_stream_ends_after_the_last_one():
    async with Pump(maxsize=2) as pump:
        async def image(name: str, n: int):
            for i in range(n):
                await pump.put(f"{name}{i}")

        async def reader():  # a producer that spawns more, as the streaming servicer does
            for name, n in (("a", 3), ("b", 2)):
                pump.spawn(image(name, n))

        pump.spawn(reader())
        items = [item async for item in pump]
    assert sorted(items) == ["a0", "a1", "a2", "b0", "b1"]
    assert [i for i in items if i.startswith("a")] == ["a0", "a1", "a2"]  # each producer's order kept


@pytest.mark.asyncio
async def test_a_producers_error_is_raised_after_the_items_it_queued_before_it():
    async with Pump() as pump:
        async def failing():
            await pump.put(1)
            await pump.put(2)
            raise ValueError("producer broke")

        pump.spawn(failing())
        seen = []
        with pytest.raises(ValueError, match="producer broke"):
            async for item in pump:
                seen.append(item)
    assert seen == [1, 2]


@pytest.mark.asyncio
async def test_leaving_early_cancels_the_producers_still_running():
    cancelled = asyncio.Event()
    never = asyncio.Event()

    async def endless(pump: Pump):
        await pump.put("first")
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Pump() as pump:
        pump.spawn(endless(pump))
        async for item in pump:
            assert item == "first"
            break
    assert cancelled.is_set()  # by the time the block is left


@pytest.mark.asyncio
async def test_a_full_pump_holds_its_producer_back():
    put = []

    async def eager(pump: Pump):
        for i in range(5):
            await pump.put(i)
            put.append(i)

    async with Pump(maxsize=1) as pump:
        pump.spawn(eager(pump))
        consumed = []
        async for item in pump:
            consumed.append(item)
            assert len(put) <= len(consumed) + 1  # never more than one item ahead of the consumer
    assert consumed == [0, 1, 2, 3, 4]


@pytest.mark.asyncio
async def test_items_from_a_thread_and_its_error():
    async with Pump() as pump:
        def produce():
            for i in range(3):
                pump.put_threadsafe(i)
            raise RuntimeError("thread broke")

        pump.spawn(asyncio.get_running_loop().run_in_executor(None, produce))
        seen = []
        with pytest.raises(RuntimeError, match="thread broke"):
            async for item in pump:
                seen.append(item)
    assert seen == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_pump_fed_only_by_a_thread_ends_where_its_consumer_stops():
    async with Pump() as pump:
        thread = threading.Thread(target=lambda: [pump.put_threadsafe(i) for i in (1, 2, None)])
        thread.start()
        seen = []
        async for item in pump:
            if item is None:
                break
            seen.append(item)
        thread.join(WAIT)
    assert seen == [1, 2]
