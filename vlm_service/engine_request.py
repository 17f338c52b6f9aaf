"""What the decode engine needs of one request (built by the backend on the caller's thread, read by the
scheduler and the engine on the model thread)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from serving import tracing
from vlm_service.messages import Delivery


@dataclass
class EngineRequest:
    """What the engine needs of one request. ``inputs`` are CPU tensors (moved to the device here)."""

    inputs: dict[str, Any]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    deliver: Callable[[Delivery], None]  # on the model thread: Tokens..., then one Finished or Failed
    should_stop: Callable[[], bool] | None = None
    deadline: float | None = None  # time.monotonic() after which the request stops ("deadline")
    cancelled: threading.Event = field(default_factory=threading.Event)
    grammar: Any = None  # the request's compiled grammar (None: the engine's), e.g. with boxes (locate_sources)
    priority: str = "interactive"  # the scheduler's admission order (serving.priority)
    # Made where the request is submitted, on its RPC's task: its trace spans (no-op when tracing is off).
    phases: tracing.Phases = field(default_factory=lambda: tracing.request_phases("vlm.queue_wait"))
    queued_at: float = field(default_factory=time.perf_counter)  # its arrival (the queue-wait metric)

    def stop_reason(self) -> str | None:
        if self.cancelled.is_set() or (self.should_stop is not None and self.should_stop()):
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None
