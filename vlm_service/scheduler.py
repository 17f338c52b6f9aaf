"""The VLM request queue and decode loop, on the backend's model thread (vLLM's scheduler, in small).

Callers submit from any thread into a bounded queue (``Overloaded`` when full). One loop runs on the
model thread while there is work: at each step boundary it admits waiting requests into the engine's free
rows (interactive before batch, with aging; batch work leaving rows to interactive work: serving.priority),
then runs one engine step; without an engine it runs the reference ``generate()`` for one request
after another. The loop returns when there is nothing left, and the next submission starts it again.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from serving.errors import NotReady, Overloaded
from serving.priority import BATCH, PriorityOrder
from vlm_service.engine import DecodeEngine, EngineRequest
from vlm_service.messages import Finished

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
                    if engine is None:
                        admit = self.order.take(self._pending, 1, _priority)
                    else:
                        holding = sum(row is not None and row.req.priority != BATCH for row in engine.rows)
                        admit = self.order.admit(self._pending, engine.free_slots, len(engine.rows), holding,
                                                 _priority)
                    if not admit and (engine is None or engine.active == 0):
                        self._running = False
                        return
            if self._closed:
                for req in admit:
                    req.deliver(Finished("cancelled", 0))
                if engine is not None:
                    engine.cancel_all()
                return
            if engine is None:
                for req in admit:
                    self.reference(req)
                continue
            try:
                for req in admit:
                    engine.admit(req)
                engine.step()
            except BaseException as exc:  # noqa: BLE001 - a broken step fails its batch, not the service
                log.exception("decode step failed")
                engine.fail_all(exc)


def _priority(req: EngineRequest) -> str:
    return req.priority
