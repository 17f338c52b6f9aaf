"""Interactive work before batch work, with aging, at every stage: the orchestrator's admission, the VLM
scheduler's admission and the audio batcher (serving.priority). Orchestration only: FAKE models; the order of
admission is checked, never a time.

At each stage: one request runs, 60 batch requests wait, then one interactive request arrives; it is the next
one admitted, and every batch request still completes.
"""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from audio_service.batching import Batcher
from orchestrator.admission import Admission, StreamShare
from serving.blocking import ModelWorker
from serving.priority import BATCH, INTERACTIVE, PriorityOptions, PriorityOrder
from vlm_service.engine_request import EngineRequest
from vlm_service.messages import Finished
from vlm_service.scheduler import Scheduler
from tests.unit.test_batching import FakeCountingAudioBackend, req, wait_thread_event, wait_until

BOUND = 60.0  # seconds any wait may take before the test fails (never a sleep)
QUEUED_BATCH = 60


def test_aging_gives_batch_work_one_turn_in_every_n_plus_one():
    order = PriorityOrder(batch_aging=3)
    waiting = [(BATCH, i) for i in range(5)]
    served = []
    for turn in range(20):
        waiting.append((INTERACTIVE, turn))  # interactive work never stops arriving
        served.append(order.pick(waiting, lambda item: item[0]))
        waiting.remove(served[-1])
    kinds = "".join("b" if kind == BATCH else "i" for kind, _ in served)
    assert kinds == "iiib" * 5  # the bound: never more than 3 interactive turns in a row while batch waits
    assert [n for kind, n in served if kind == BATCH] == [0, 1, 2, 3, 4]  # batch work keeps its own order


def test_without_batch_work_waiting_interactive_turns_do_not_count_against_it():
    order = PriorityOrder(batch_aging=1)
    for turn in range(5):
        assert order.pick([(INTERACTIVE, turn)], lambda item: item[0]) == (INTERACTIVE, turn)
    # Batch work that arrives now waits behind one interactive turn at most, not behind the five before it.
    assert order.pick([(BATCH, 0), (INTERACTIVE, 9)], lambda item: item[0]) == (INTERACTIVE, 9)
    assert order.pick([(BATCH, 0), (INTERACTIVE, 10)], lambda item: item[0]) == (BATCH, 0)


def test_aging_must_let_interactive_work_go_first_at_least_once():
    with pytest.raises(ValueError, match="at least 1"):
        PriorityOrder(batch_aging=0)
    with pytest.raises(ValueError, match="at least 1"):
        PriorityOptions.__dataclass_fields__["batch_aging"].metadata["check"](0)


async def test_orchestrator_admission_serves_an_interactive_image_before_60_waiting_batch_images():
    admission = Admission(total=1, max_waiting=100, wait_seconds=BOUND, order=PriorityOrder(batch_aging=4))
    running = admission.slot(StreamShare(), BATCH)
    await running.__aenter__()
    admitted: list[str] = []
    release = {}

    async def image(name: str, priority: str) -> None:
        async with admission.slot(StreamShare(), priority):
            admitted.append(name)
            release[name] = asyncio.Event()
            await release[name].wait()

    batch = [asyncio.ensure_future(image(f"batch-{i}", BATCH)) for i in range(QUEUED_BATCH)]
    await wait_until(lambda: admission.waiting == QUEUED_BATCH)
    interactive = asyncio.ensure_future(image("interactive", INTERACTIVE))
    await wait_until(lambda: admission.waiting == QUEUED_BATCH + 1)

    await running.__aexit__(None, None, None)
    await wait_until(lambda: len(admitted) == 1)
    assert admitted == ["interactive"]  # next, ahead of the 60 batch images that came first
    release["interactive"].set()
    await interactive
    for i in range(QUEUED_BATCH):  # every batch image is still admitted, in its order
        await wait_until(lambda: len(admitted) == i + 2)
        assert admitted[-1] == f"batch-{i}"
        release[admitted[-1]].set()
    await asyncio.wait_for(asyncio.gather(*batch), BOUND)
    assert admission.running == 0


class FakeRowsEngine:
    """NOT a model: the scheduler's view of a decode engine with `rows` rows, where each admitted request
    finishes at the end of its first step. The first step waits for `go`, so requests queue up behind a
    running one. `admitted` records (step, request name) of every admission."""

    options = SimpleNamespace(prefill_chunk=0)

    def __init__(self, rows: int = 1):
        self.rows: list = [None] * rows
        self.admitted: list[tuple[int, str]] = []
        self.steps = 0
        self.first_step, self.go = threading.Event(), threading.Event()

    @property
    def free_slots(self) -> int:
        return self.rows.count(None)

    @property
    def active(self) -> int:
        return len(self.rows) - self.free_slots

    def run(self, plan) -> None:
        for new in plan.admit:
            self.admitted.append((self.steps, new.req.inputs["name"]))
            self.rows[new.slot] = SimpleNamespace(req=new.req, slot=new.slot, finished=None, decoding=True,
                                                  prompt_left=0)
        self.first_step.set()
        assert self.go.wait(BOUND)
        self.steps += 1
        finished, self.rows = [row for row in self.rows if row is not None], [None] * len(self.rows)
        for row in finished:
            row.req.deliver(Finished("stop", 1))

    def cancel_all(self) -> None:
        pass

    def fail_all(self, exc: BaseException) -> None:
        raise AssertionError(f"the step failed: {exc!r}")


def engine_request(name: str, priority: str, done: list[str]) -> EngineRequest:
    return EngineRequest(inputs={"name": name}, max_new_tokens=1, temperature=0.0, top_p=1.0, seed=None,
                         deliver=lambda item: done.append(name), priority=priority)


def run_scheduler(engine: FakeRowsEngine, order: PriorityOrder, later: list[tuple[str, str]]) -> list[str]:
    """One batch request decoding, then `later` (name, priority) submitted behind it; returns the names in
    the order they finished once the engine may go on."""
    worker, done = ModelWorker("fake-vlm"), []
    scheduler = Scheduler(worker, max_queue=100, engine=engine, reference=None, order=order)
    try:
        scheduler.submit(engine_request("running", BATCH, done))
        assert engine.first_step.wait(BOUND)  # its row is decoding; everything below waits
        for name, priority in later:
            scheduler.submit(engine_request(name, priority, done))
        assert scheduler.queue_depth == len(later)
        engine.go.set()
        finished = threading.Event()
        worker.submit(finished.set)  # queued behind the decode loop: runs once the loop has nothing left
        assert finished.wait(BOUND)
        assert scheduler.queue_depth == 0
        return done
    finally:
        scheduler.close()


def vlm_waits_counted(priority: str) -> float:
    return REGISTRY.get_sample_value("i2s_queue_wait_seconds_count", {"stage": "vlm", "priority": priority}) or 0.0


def test_vlm_scheduler_admits_an_interactive_request_before_60_waiting_batch_requests():
    engine = FakeRowsEngine(rows=1)
    later = [(f"batch-{i}", BATCH) for i in range(QUEUED_BATCH)] + [("interactive", INTERACTIVE)]
    waits_before = {p: vlm_waits_counted(p) for p in (INTERACTIVE, BATCH)}
    done = run_scheduler(engine, PriorityOrder(batch_aging=4, reserved=1), later)
    admitted = [name for _, name in engine.admitted]
    assert admitted[:2] == ["running", "interactive"]  # the next free row went to the interactive request
    assert admitted[2:] == [f"batch-{i}" for i in range(QUEUED_BATCH)]  # batch work completes, in order
    assert sorted(done) == sorted(admitted)
    # Each admission's wait is in i2s_queue_wait_seconds{stage="vlm"}, under its own priority.
    assert vlm_waits_counted(INTERACTIVE) - waits_before[INTERACTIVE] == 1
    assert vlm_waits_counted(BATCH) - waits_before[BATCH] == QUEUED_BATCH + 1


def test_vlm_batch_work_leaves_a_row_free_and_yields_rows_while_interactive_work_decodes():
    engine = FakeRowsEngine(rows=4)
    later = [(f"b{i}", BATCH) for i in range(7)] + [("interactive", INTERACTIVE)]
    run_scheduler(engine, PriorityOrder(batch_aging=4, reserved=1), later)
    by_step: dict[int, list[str]] = {}
    for step, name in engine.admitted:
        by_step.setdefault(step, []).append(name)
    # After the running row's step: the interactive request decodes alone (no batch row joins it); then batch
    # work fills three of the four rows, one always left for interactive requests that arrive.
    assert list(by_step.values()) == [["running"], ["interactive"], ["b0", "b1", "b2"], ["b3", "b4", "b5"], ["b6"]]


def test_aging_admits_batch_work_beside_interactive_work_after_n_interactive_turns():
    order = PriorityOrder(batch_aging=2, reserved=1)
    waiting = [(BATCH, 0), (BATCH, 1), (INTERACTIVE, 0), (INTERACTIVE, 1), (INTERACTIVE, 2)]
    taken = order.admit(waiting, free=8, capacity=8, interactive_holding=0, priority_of=lambda item: item[0])
    assert taken == [(INTERACTIVE, 0), (INTERACTIVE, 1), (BATCH, 0), (INTERACTIVE, 2)]
    assert waiting == [(BATCH, 1)]  # not its aging turn, and interactive work holds rows: it waits
    # With one row only, none is reserved: batch work can always run.
    assert PriorityOrder(reserved=1).admit([(BATCH, 0)], 1, 1, 0, lambda item: item[0]) == [(BATCH, 0)]


async def test_audio_batcher_runs_an_interactive_clip_before_60_waiting_batch_clips():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=0, max_queue=100, order=PriorityOrder(batch_aging=4))
    running = asyncio.ensure_future(batcher.submit(req(1000), priority=BATCH))
    await wait_thread_event(backend.started)  # the first call runs; the clips below queue behind it
    batch = [asyncio.ensure_future(batcher.submit(req(i), priority=BATCH)) for i in range(QUEUED_BATCH)]
    # A different clip length: it cannot ride along with the batch clips, so it needs a call of its own.
    interactive = asyncio.ensure_future(batcher.submit(req(7777, duration_seconds=2.0), priority=INTERACTIVE))
    await wait_until(lambda: batcher.queue_depth == QUEUED_BATCH + 1)
    backend.proceed.set()
    await asyncio.wait_for(asyncio.gather(running, interactive, *batch), BOUND)
    calls = [[r.seed for r in call] for call in backend.calls]
    assert calls[0] == [1000] and calls[1] == [7777]  # the next call was the interactive clip's
    assert [seed for call in calls[2:] for seed in call] == list(range(QUEUED_BATCH))  # all batch clips ran
    await batcher.close()


async def test_audio_batcher_puts_an_interactive_clip_into_the_next_call_when_it_can_share_it():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=0, max_queue=100)
    running = asyncio.ensure_future(batcher.submit(req(1000), priority=BATCH))
    await wait_thread_event(backend.started)
    batch = [asyncio.ensure_future(batcher.submit(req(i), priority=BATCH)) for i in range(QUEUED_BATCH)]
    interactive = asyncio.ensure_future(batcher.submit(req(7777), priority=INTERACTIVE))  # same settings
    await wait_until(lambda: batcher.queue_depth == QUEUED_BATCH + 1)
    backend.proceed.set()
    await asyncio.wait_for(asyncio.gather(running, interactive, *batch), BOUND)
    calls = [[r.seed for r in call] for call in backend.calls]
    assert calls[1] == [7777, 0, 1, 2]  # it leads the next call; the oldest batch clips fill the rest
    assert sorted(seed for call in calls[2:] for seed in call) == list(range(3, QUEUED_BATCH))
    await batcher.close()
