"""Batcher logic with a FAKE backend (no model): grouping, routing, cancellation, back-pressure.

The batcher with the real tiny AudioLDM2 backend is tested in tests/integration/test_audio_backend.py.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Sequence

import numpy as np
import pytest

from audio_service.backend import AudioBackend, AudioRequest, AudioResult, BackendCancelled, check_batch, num_samples
from audio_service.batching import Batcher, NotReady, Overloaded
from serving.errors import Overloaded as ServingOverloaded

WAIT = 10.0  # seconds a test waits on an event before failing (never a sleep)


class FakeCountingAudioBackend(AudioBackend):
    """NOT a model: returns a constant waveform (seed / 1000) per request and records every call.

    With `gated=True` each step waits for `proceed` (a threading.Event the test sets), and `step_done`
    is set after each step, so a test can act "between steps" without sleeping.
    """

    model_id = "fake-counting"
    sample_rate_hertz = 100

    def __init__(self, *, gated: bool = False, fail_with: Exception | None = None):
        self.calls: list[list[AudioRequest]] = []
        self.deadlines: list = []  # the deadline each call was given
        self.cancelled_after: list[int] = []
        self.gated = gated
        self.fail_with = fail_with
        self.started = threading.Event()
        self.step_done = threading.Event()
        self.proceed = threading.Event()
        self.finished = threading.Event()

    def load(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def generate(self, requests: Sequence[AudioRequest], *, should_stop=None, on_step=None,
                 deadline=None) -> list[AudioResult]:
        check_batch(requests)  # the batcher must only group compatible requests
        self.calls.append(list(requests))
        self.deadlines.append(deadline)
        self.started.set()
        try:
            total = requests[0].num_inference_steps
            for step in range(1, total + 1):
                if should_stop is not None and should_stop():
                    self.cancelled_after.append(step - 1)
                    raise BackendCancelled(step - 1, total)
                if on_step is not None:
                    on_step(step, total)
                if self.gated:
                    self.step_done.set()
                    assert self.proceed.wait(WAIT)
            if self.fail_with is not None:
                raise self.fail_with
            return [
                AudioResult(
                    waveform=np.full(num_samples(r.duration_seconds, self.sample_rate_hertz), r.seed / 1000, np.float32),
                    sample_rate_hertz=self.sample_rate_hertz, score=None, steps_run=total, scheduler=r.scheduler,
                    model_id=self.model_id,
                )
                for r in requests
            ]
        finally:
            self.finished.set()


def req(seed: int, **kw) -> AudioRequest:
    kw.setdefault("duration_seconds", 1.0)
    kw.setdefault("num_inference_steps", 3)
    return AudioRequest(prompt=f"sound {seed}", seed=seed, **kw)


async def wait_until(condition) -> None:
    """Yields to the event loop until `condition()` holds (bounded number of turns; no sleeping)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT)


@pytest.mark.asyncio
async def test_concurrent_compatible_requests_share_one_backend_call():
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=1000)
    requests = [req(seed) for seed in (11, 22, 33, 44)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert batcher.backend_calls == 1 < len(requests)
    assert [len(c) for c in backend.calls] == [4]
    for r, result in zip(requests, results):  # each caller got its own clip
        assert result.waveform.shape == (100,)
        assert np.all(result.waveform == np.float32(r.seed / 1000))
    await batcher.close()


@pytest.mark.asyncio
async def test_batches_are_capped_at_max_batch_size():
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend, max_batch_size=2, max_wait_ms=20)  # the last, partial batch waits 20 ms
    results = await asyncio.gather(*(batcher.submit(req(s)) for s in range(5)))
    assert [r.waveform[0] for r in results] == [np.float32(s / 1000) for s in range(5)]
    assert [len(call) for call in backend.calls] == [2, 2, 1] and batcher.backend_calls == 3
    assert batcher.requests_batched == 5 and batcher.last_batch_size == 1
    await batcher.close()


@pytest.mark.asyncio
async def test_incompatible_settings_go_in_separate_calls():
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend, max_batch_size=8, max_wait_ms=0)
    requests = [
        req(1), req(2, duration_seconds=2.0), req(3), req(4, scheduler="ddim"), req(5, duration_seconds=2.0),
        req(6, num_candidates=2), req(7, guidance_scale=5.0), req(8, num_inference_steps=4),
    ]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for r, result in zip(requests, results):
        assert len(result.waveform) == num_samples(r.duration_seconds, 100)
        assert result.waveform[0] == np.float32(r.seed / 1000)
        assert result.scheduler == r.scheduler
    keys = [{r.batch_key() for r in call} for call in backend.calls]
    assert all(len(k) == 1 for k in keys)  # every call is homogeneous
    assert len(backend.calls) == len({r.batch_key() for r in requests}) == 6
    assert sorted(r.seed for call in backend.calls for r in call) == [r.seed for r in requests]
    await batcher.close()


@pytest.mark.asyncio
async def test_cancelled_caller_queued_request_never_runs():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=0)
    first = asyncio.create_task(batcher.submit(req(1)))
    await wait_thread_event(backend.started)  # req 1 is running (and blocked between steps)
    queued = asyncio.create_task(batcher.submit(req(2)))
    await wait_until(lambda: batcher.queue_depth == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert batcher.queue_depth == 0
    backend.proceed.set()
    result = await first
    assert result.waveform[0] == np.float32(0.001)
    await batcher.close()  # waits for the dispatcher: nothing else can run after this
    assert [[r.seed for r in call] for call in backend.calls] == [[1]]


@pytest.mark.asyncio
async def test_all_callers_cancelled_stops_the_running_batch():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=0)
    progress: list[tuple[int, int]] = []
    task = asyncio.create_task(batcher.submit(req(1, num_inference_steps=10), on_step=lambda d, t: progress.append((d, t))))
    await wait_thread_event(backend.step_done)  # step 1 of 10 done, the backend waits for `proceed`
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    backend.proceed.set()
    await wait_thread_event(backend.finished)
    await batcher.close()
    assert backend.cancelled_after == [1]  # should_stop turned true: it stopped after 1 of 10 steps
    assert progress in ([], [(1, 10)])  # progress after the cancellation is not delivered


@pytest.mark.asyncio
async def test_one_cancelled_caller_does_not_stop_its_batch_mates():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=2, max_wait_ms=1000)
    a = asyncio.create_task(batcher.submit(req(1)))
    b = asyncio.create_task(batcher.submit(req(2)))
    await wait_thread_event(backend.step_done)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    backend.proceed.set()
    result = await b
    assert result.waveform[0] == np.float32(0.002) and backend.cancelled_after == []
    await batcher.close()


@pytest.mark.asyncio
async def test_full_queue_raises_overloaded():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=1, max_wait_ms=0, max_queue=2)
    running = asyncio.create_task(batcher.submit(req(1)))
    await wait_thread_event(backend.started)
    waiting = [asyncio.create_task(batcher.submit(req(s))) for s in (2, 3)]
    await wait_until(lambda: batcher.queue_depth == 2)
    with pytest.raises(Overloaded):
        await batcher.submit(req(4))
    assert Overloaded is ServingOverloaded  # mapped to RESOURCE_EXHAUSTED in serving.errors
    backend.proceed.set()
    results = await asyncio.gather(running, *waiting)
    assert [r.waveform[0] for r in results] == [np.float32(s / 1000) for s in (1, 2, 3)]
    await batcher.close()


@pytest.mark.asyncio
async def test_progress_reaches_every_caller_of_a_batch():
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend, max_batch_size=2, max_wait_ms=1000)
    seen: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
    await asyncio.gather(*(batcher.submit(req(s), on_step=lambda d, t, s=s: seen[s].append((d, t))) for s in (1, 2)))
    assert seen == {1: [(1, 3), (2, 3), (3, 3)], 2: [(1, 3), (2, 3), (3, 3)]}
    assert batcher.backend_calls == 1
    await batcher.close()


@pytest.mark.asyncio
async def test_backend_errors_reach_the_callers_and_the_batcher_goes_on():
    backend = FakeCountingAudioBackend(fail_with=RuntimeError("device lost"))
    batcher = Batcher(backend, max_batch_size=2, max_wait_ms=20)
    outcomes = await asyncio.gather(batcher.submit(req(1)), batcher.submit(req(2)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "device lost" in str(o) for o in outcomes)
    backend.fail_with = None
    assert (await batcher.submit(req(3))).waveform[0] == np.float32(0.003)
    await batcher.close()


@pytest.mark.asyncio
async def test_invalid_requests_are_rejected_before_queueing_and_close_refuses_new_work():
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend)
    with pytest.raises(ValueError, match="duration_seconds"):
        await batcher.submit(req(1, duration_seconds=301.0))
    assert batcher.backend_calls == 0
    await batcher.close()
    with pytest.raises(NotReady):
        await batcher.submit(req(1))


@pytest.mark.asyncio
async def test_close_fails_queued_requests():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=1, max_wait_ms=0)
    running = asyncio.create_task(batcher.submit(req(1)))
    await wait_thread_event(backend.started)
    queued = asyncio.create_task(batcher.submit(req(2)))
    await wait_until(lambda: batcher.queue_depth == 1)
    closing = asyncio.create_task(batcher.close())
    with pytest.raises(NotReady):
        await queued
    backend.proceed.set()
    assert (await running).waveform[0] == np.float32(0.001)  # the running batch finishes
    await closing
    assert [[r.seed for r in call] for call in backend.calls] == [[1]]


class FakeBucketingAudioBackend(FakeCountingAudioBackend):
    """NOT a model: the counting fake with the real backend's bucketed batch key (durations up to 2 s share)."""

    def batch_key(self, request: AudioRequest) -> tuple:
        return ("bucket", 2.0 if request.duration_seconds <= 2.0 else request.duration_seconds) + request.batch_key()[1:]

    def generate(self, requests: Sequence[AudioRequest], *, should_stop=None, on_step=None,
                 deadline=None) -> list[AudioResult]:
        assert len({self.batch_key(r) for r in requests}) == 1
        self.calls.append(list(requests))
        return [AudioResult(waveform=np.full(num_samples(r.duration_seconds, self.sample_rate_hertz), r.seed, np.float32),
                            sample_rate_hertz=self.sample_rate_hertz, score=None, steps_run=r.num_inference_steps,
                            scheduler=r.scheduler, model_id=self.model_id) for r in requests]


@pytest.mark.asyncio
async def test_requests_of_different_durations_in_one_bucket_share_a_batch_across_clients():
    backend = FakeBucketingAudioBackend()
    batcher = Batcher(backend, max_batch_size=3, max_wait_ms=10_000)  # leaves when full, not on time

    async def client(seed: int, seconds: float) -> AudioResult:  # each its own caller, as two images would be
        return await batcher.submit(req(seed, duration_seconds=seconds))

    results = await asyncio.gather(client(1, 1.0), client(2, 1.5), client(3, 2.0))
    assert [[r.seed for r in call] for call in backend.calls] == [[1, 2, 3]]
    assert [r.waveform.shape[0] for r in results] == [100, 150, 200]  # each its own length
    await batcher.close()


class FakeWindowingAudioBackend(FakeBucketingAudioBackend):
    """NOT a model: the bucketing fake that also records the windows it was given."""

    def __init__(self):
        super().__init__()
        self.windows: list = []

    def generate(self, requests, *, should_stop=None, on_step=None, deadline=None, windows=None):
        self.windows.append(windows)
        return super().generate(requests, should_stop=should_stop, on_step=on_step, deadline=deadline)


@pytest.mark.asyncio
async def test_windows_of_different_long_clips_share_a_call_and_never_ride_with_plain_clips():
    from audio_service.backend import Window

    backend = FakeWindowingAudioBackend()
    batcher = Batcher(backend, max_batch_size=3, max_wait_ms=10_000)  # leaves when full, not on time
    first = Window(index=0, overlap_frames=4)
    later = Window(index=3, overlap_frames=4, context=np.zeros((2, 4, 3), np.float32))
    jobs = [asyncio.create_task(batcher.submit(req(1), window=first)),
            asyncio.create_task(batcher.submit(req(2))),  # a plain clip of the same settings
            asyncio.create_task(batcher.submit(req(3), window=later)),
            asyncio.create_task(batcher.submit(req(4), window=first))]
    await asyncio.wait_for(asyncio.gather(*jobs[:1], *jobs[2:]), WAIT)
    assert [r.seed for r in backend.calls[0]] == [1, 3, 4] and backend.windows[0] == [first, later, first]
    await batcher.close()
    with pytest.raises(NotReady):  # the plain clip waited for a call of its own
        await jobs[1]
