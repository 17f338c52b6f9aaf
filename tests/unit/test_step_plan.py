"""The VLM scheduler's decisions for one step (vlm_service.scheduler.plan_step): stops, admission into rows,
whole or chunked prefill, which prompt gets the chunk, which rows decode. The engine here is a FAKE view
(rows and prompt sizes, no model): the real engine running these plans is tests/integration/test_vlm_engine.py.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from serving.blocking import ModelWorker
from vlm_service.engine_request import EngineRequest
from vlm_service.messages import Failed, Finished
from vlm_service.scheduler import Scheduler, plan_step
from vlm_service.step_plan import NewRow, StepPlan
from tests.unit.test_priority import FakeRowsEngine

CHUNK = 16
BOUND = 60.0


def request(prompt_tokens: int, name: str = "", deliver=lambda item: None, **kwargs) -> EngineRequest:
    return EngineRequest(inputs={"tokens": prompt_tokens, "name": name}, max_new_tokens=8, temperature=0.0,
                         top_p=1.0, seed=None, deliver=deliver, **kwargs)


def row(slot: int, prompt_left: int = 0, req: EngineRequest | None = None) -> SimpleNamespace:
    return SimpleNamespace(req=req or request(0), slot=slot, finished=None, decoding=prompt_left == 0,
                           prompt_left=prompt_left)


class FakeEngineView:
    """NOT a model: what plan_step reads of a decode engine (its rows, the chunk size, a prompt's size)."""

    def __init__(self, rows: list, prefill_chunk: int = CHUNK):
        self.rows = rows
        self.options = SimpleNamespace(prefill_chunk=prefill_chunk)

    @staticmethod
    def prompt_work(req: EngineRequest) -> int:
        return req.inputs["tokens"]


def test_an_idle_engine_prefills_the_first_arrival_whole_and_chunks_the_next_beside_it():
    first, second = request(100), request(100)
    plan = plan_step(FakeEngineView([None, None, None]), [first, second])
    assert plan.admit == (NewRow(first, 0, chunked=False), NewRow(second, 1, chunked=True))
    assert plan.chunk == 1  # its first chunk runs in this step ...
    assert plan.decode == (0,)  # ... and only the whole-prefilled row decodes: the prompt is not in yet


def test_a_prompt_no_longer_than_a_chunk_is_prefilled_whole_even_while_rows_decode():
    short = request(CHUNK)
    plan = plan_step(FakeEngineView([row(0), None]), [short])
    assert plan.admit == (NewRow(short, 1, chunked=False),)
    assert plan.chunk is None and plan.decode == (0, 1)


def test_without_chunking_every_prompt_is_prefilled_whole():
    plan = plan_step(FakeEngineView([row(0), None], prefill_chunk=0), [request(1000)])
    assert not plan.admit[0].chunked and plan.decode == (0, 1)


def test_the_lowest_waiting_prompt_gets_the_chunk_and_its_last_chunk_decodes_in_the_same_step():
    view = FakeEngineView([row(0), row(1, prompt_left=40), row(2, prompt_left=5)])
    assert plan_step(view, []) == StepPlan(chunk=1, decode=(0,))
    view.rows[1] = row(1, prompt_left=CHUNK)  # exactly one chunk left
    assert plan_step(view, []) == StepPlan(chunk=1, decode=(0, 1))


def test_rows_whose_caller_left_or_whose_deadline_passed_stop_and_their_rows_are_not_reused_in_that_step():
    gone = request(0)
    gone.cancelled.set()
    late = request(0, deadline=time.monotonic() - 1)
    view = FakeEngineView([row(0, req=gone), row(1), row(2, prompt_left=40, req=late), None])
    newcomer = request(8)
    plan = plan_step(view, [newcomer])
    assert plan.stop == ((0, "cancelled"), (2, "deadline"))
    assert plan.admit == (NewRow(newcomer, 3, chunked=False),)  # the one free row, not a stopping one
    assert plan.chunk is None and plan.decode == (1, 3)


def test_more_requests_than_free_rows_is_refused():
    with pytest.raises(ValueError, match="2 requests to admit into 1 free rows"):
        plan_step(FakeEngineView([row(0), None]), [request(1), request(1)])


def test_nothing_to_do_is_an_idle_plan():
    assert plan_step(FakeEngineView([None, None]), []).idle
    assert not plan_step(FakeEngineView([row(0), None]), []).idle


def test_a_request_whose_caller_left_while_it_waited_ends_without_being_admitted():
    engine, worker = FakeRowsEngine(rows=1), ModelWorker("fake-vlm")
    engine.go.set()
    scheduler = Scheduler(worker, max_queue=10, engine=engine, reference=None)
    ended: dict[str, Finished] = {}
    both = threading.Event()

    def deliver_to(name: str):
        def deliver(item) -> None:
            ended[name] = item
            if len(ended) == 2:
                both.set()
        return deliver

    try:
        left = request(4, "left", deliver=deliver_to("left"))
        left.cancelled.set()
        scheduler.submit(left)
        scheduler.submit(request(4, "stays", deliver=deliver_to("stays")))
        assert both.wait(BOUND)
        assert ended["left"] == Finished("cancelled", 0)
        assert ended["stays"] == Finished("stop", 1)
        assert [name for _, name in engine.admitted] == ["stays"]
    finally:
        scheduler.close()
        worker.close()


def test_a_plan_that_cannot_be_made_fails_its_requests_and_the_next_request_is_served(monkeypatch):
    import vlm_service.scheduler as scheduler_module

    def planning_bug(engine, admit):
        if any(req.inputs["name"] == "bad" for req in admit):
            raise KeyError("input_ids")  # e.g. a request built without its token ids
        return plan_step(engine, admit)

    monkeypatch.setattr(scheduler_module, "plan_step", planning_bug)
    engine, worker = FakeRowsEngine(rows=1), ModelWorker("fake-vlm")
    engine.go.set()
    scheduler = Scheduler(worker, max_queue=10, engine=engine, reference=None)
    got: dict[str, list] = {"bad": [], "good": []}
    good_done = threading.Event()

    def deliver_to(name: str):
        def deliver(item) -> None:
            got[name].append(item)
            if name == "good":
                good_done.set()
        return deliver

    try:
        scheduler.submit(request(4, "bad", deliver=deliver_to("bad")))
        scheduler.submit(request(4, "good", deliver=deliver_to("good")))
        assert good_done.wait(BOUND)
        (failed,) = got["bad"]  # exactly one message: its error
        assert isinstance(failed, Failed) and isinstance(failed.error, KeyError)
        assert got["good"] == [Finished("stop", 1)]
    finally:
        scheduler.close()
        worker.close()
