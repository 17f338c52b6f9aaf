"""serving.blocking.ModelWorker: the threads a backend's blocking calls run on, as many as the backend takes
requests at once, and the bounded queue in front of them. Fake work only (events and barriers, no model)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from serving.blocking import ModelWorker
from serving.errors import Overloaded

WAIT = 10.0  # seconds a test waits on an event before failing (never a sleep)


async def _drain(worker: ModelWorker, make_iter) -> list:
    return [item async for item in worker.stream(make_iter)]


@pytest.mark.asyncio
async def test_a_worker_runs_as_many_streams_at_once_as_its_concurrency():
    worker = ModelWorker("test", concurrency=3)
    together = threading.Barrier(3, timeout=WAIT)  # broken (an error) unless all three run at the same time

    def produce(should_stop):
        yield together.wait()

    try:
        results = await asyncio.wait_for(asyncio.gather(*(_drain(worker, produce) for _ in range(3))), WAIT)
    finally:
        worker.close()
    assert sorted(r[0] for r in results) == [0, 1, 2]  # each stream passed the barrier: they overlapped


@pytest.mark.asyncio
async def test_a_one_thread_worker_runs_one_stream_at_a_time():
    worker = ModelWorker("test")
    running, peak, lock = 0, 0, threading.Lock()
    first_started, release = threading.Event(), threading.Event()

    def produce(should_stop):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        first_started.set()
        release.wait(WAIT)
        with lock:
            running -= 1
        yield "done"

    streams = [asyncio.ensure_future(_drain(worker, produce)) for _ in range(3)]
    assert await asyncio.to_thread(first_started.wait, WAIT)
    release.set()
    try:
        assert await asyncio.wait_for(asyncio.gather(*streams), WAIT) == [["done"]] * 3
    finally:
        worker.close()
    assert peak == 1


@pytest.mark.asyncio
async def test_beyond_the_running_streams_at_most_max_queue_wait():
    worker = ModelWorker("test", max_queue=1, concurrency=2)
    release = threading.Event()

    def produce(should_stop):
        release.wait(WAIT)
        yield "done"

    # Tasks start in order: two take the threads, one the queue's one place, the fourth is refused.
    streams = [asyncio.ensure_future(_drain(worker, produce)) for _ in range(4)]
    with pytest.raises(Overloaded, match="1 requests already waiting"):
        await asyncio.wait_for(streams[3], WAIT)
    assert worker.queue_depth == 1  # what the service's queue-depth gauge reads: the one waiting, not the two running
    release.set()
    try:
        assert await asyncio.wait_for(asyncio.gather(*streams[:3]), WAIT) == [["done"]] * 3
        assert worker.queue_depth == 0
    finally:
        worker.close()


def test_run_from_the_workers_own_thread_runs_inline():
    worker = ModelWorker("test")
    try:
        # A backend method calling another on the one thread: queued behind itself, it would never run.
        outer = worker.submit(lambda: (worker.on_thread(), worker.run(threading.get_ident)))
        on_thread, inner_thread = outer.result(WAIT)
        assert on_thread and inner_thread == worker.submit(threading.get_ident).result(WAIT)
        assert not worker.on_thread()
        assert worker.run(threading.get_ident) != threading.get_ident()  # from elsewhere: on the worker
    finally:
        worker.close()
