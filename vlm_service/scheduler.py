"""The VLM request queue and the decisions of every decode step, on the backend's model thread (vLLM v1's
scheduler, in small).

Callers submit from any thread into a bounded queue (``Overloaded`` when full). One loop runs on the model
thread while there is work. At each step boundary it decides, and the engine runs, a
:class:`~vlm_service.step_plan.StepPlan` (:func:`plan_step`):

- **Stops.** A running row whose caller left or whose deadline passed ends now; a waiting request that did
  either ends without being admitted.
- **Admission.** Waiting requests take the engine's free rows (interactive before batch, with aging; batch
  work leaving rows to interactive work: :mod:`serving.priority`), lowest row first.
- **Prefill chunks.** A prompt that arrives while other rows decode is prefilled in chunks of
  ``prefill_chunk`` tokens, one chunk per step between their decode steps, so they are not stalled for a
  whole prefill (the lowest row's prompt first); a prompt that arrives when no row decodes is prefilled at
  once, as is one no longer than a chunk.
- **Rows.** Every row whose prompt is in decodes, a row whose last chunk runs in this step included.

Without an engine the loop runs the reference ``generate()`` for one request after another. The loop
returns when there is nothing left, and the next submission starts it again.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from serving import metrics
from serving.errors import NotReady, Overloaded
from serving.priority import BATCH, PRIORITIES, PriorityOrder
from vlm_service.engine import DecodeEngine
from vlm_service.engine_request import EngineRequest
from vlm_service.messages import Failed, Finished
from vlm_service.step_plan import NewRow, StepPlan

log = logging.getLogger(__name__)


class Scheduler:
    """Args:
        worker: the model thread (:class:`~serving.blocking.ModelWorker`); the loop runs as its job.
        max_queue: requests waiting (not yet decoding) before ``Overloaded``.
        engine: the decode engine, or None for the reference path.
        reference: runs one request with ``generate()`` (the reference path), on the model thread.
        order: which waiting requests go first when rows free up (default: interactive first, aging 4).
    """

    def __init__(self, worker: Any, *, max_queue: int, engine: DecodeEngine | None,
                 reference: Callable[[EngineRequest], None], order: PriorityOrder | None = None) -> None:
        self.worker, self.max_queue, self.engine, self.reference = worker, max_queue, engine, reference
        self.order = order or PriorityOrder()
        self._cv = threading.Condition()
        self._pending: list[EngineRequest] = []
        self._running = False
        self._closed = False
        for priority in PRIORITIES:  # both series exist from the start (at 0)
            metrics.QUEUE_WAIT.labels(stage="vlm", priority=priority)

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet admitted to the model."""
        return len(self._pending)

    def submit(self, req: EngineRequest) -> None:
        """Queue ``req``; raises NotReady (closed) or Overloaded (queue full) before anything is queued."""
        with self._cv:
            if self._closed:
                raise NotReady("backend is closed")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"{len(self._pending)} requests already waiting for the VLM; retry later")
            self._pending.append(req)
            start_loop = not self._running
            self._running = True
        if start_loop:
            self.worker.submit(self._loop)

    def close(self) -> None:
        """No more submissions; waiting requests end "cancelled"; the loop cancels the engine's rows."""
        with self._cv:
            self._closed = True
            pending, self._pending = self._pending, []
        for req in pending:
            req.deliver(Finished("cancelled", 0))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                if self._closed:
                    admit, self._pending = self._pending, []
                    self._running = False
                else:
                    left = self._take_left()
                    if engine is None:
                        admit = self.order.take(self._pending, 1, _priority)
                    else:
                        holding = sum(row is not None and row.req.priority != BATCH for row in engine.rows)
                        admit = self.order.admit(self._pending, engine.free_slots, len(engine.rows), holding,
                                                 _priority)
                    if not admit and not left and (engine is None or engine.active == 0):
                        self._running = False
                        return
            if self._closed:
                for req in admit:
                    req.deliver(Finished("cancelled", 0))
                if engine is not None:
                    engine.cancel_all()
                return
            for req, reason in left:
                req.deliver(Finished(reason, 0))
            admitted = time.perf_counter()
            for req in admit:
                metrics.QUEUE_WAIT.labels(stage="vlm", priority=req.priority).observe(admitted - req.queued_at)
            if engine is None:
                for req in admit:
                    self.reference(req)
                continue
            try:
                plan = plan_step(engine, admit)
            except BaseException as exc:  # noqa: BLE001 - a bug: these requests fail, the service goes on
                log.exception("planning a decode step failed")
                for req in admit:
                    req.deliver(Failed(exc))
                continue
            try:
                engine.run(plan)
            except BaseException as exc:  # noqa: BLE001 - a broken step fails its batch, not the service
                log.exception("decode step failed")
                engine.fail_all(exc)

    def _take_left(self) -> list[tuple[EngineRequest, str]]:
        """Waiting requests whose caller left or whose deadline passed, removed from the queue (under the lock)."""
        left = [(req, reason) for req in self._pending if (reason := req.stop_reason()) is not None]
        if left:
            gone = {id(req) for req, _ in left}
            self._pending = [req for req in self._pending if id(req) not in gone]
        return left


def plan_step(engine: DecodeEngine, admit: list[EngineRequest]) -> StepPlan:
    """The next step of ``engine`` (read, not changed), with ``admit`` (already chosen, in order) taking its
    free rows, lowest first (see the module docstring for the decisions)."""
    rows = [row for row in engine.rows if row is not None and row.finished is None]
    stop = tuple((row.slot, reason) for row in rows if (reason := row.req.stop_reason()) is not None)
    stopping = {slot for slot, _ in stop}
    rows = [row for row in rows if row.slot not in stopping]
    decode = [row.slot for row in rows if row.decoding]
    chunk_size = engine.options.prefill_chunk
    free = [slot for slot, row in enumerate(engine.rows) if row is None]
    if len(admit) > len(free):
        raise ValueError(f"{len(admit)} requests to admit into {len(free)} free rows")
    admissions = []
    waiting = {row.slot: row.prompt_left for row in rows if row.prompt_left}  # prompt tokens still to prefill
    for req, slot in zip(admit, free):
        work = engine.prompt_work(req) if chunk_size and decode else 0
        chunked = work > chunk_size
        admissions.append(NewRow(req, slot, chunked))
        if chunked:
            waiting[slot] = work
        else:
            decode.append(slot)  # prefilled now, its first token chosen: it decodes in this step
    chunk = min(waiting) if waiting else None  # the lowest row still prefilling (only with chunking)
    if chunk is not None and waiting[chunk] <= chunk_size:  # its last chunk: the row decodes right after it
        decode.append(chunk)
    return StepPlan(stop=stop, admit=tuple(admissions), chunk=chunk, decode=tuple(sorted(decode)))


def _priority(req: EngineRequest) -> str:
    return req.priority
