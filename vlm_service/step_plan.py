"""What the scheduler decides for one engine step, and the engine runs (vLLM v1's ``SchedulerOutput``, in
small). The scheduler (:mod:`vlm_service.scheduler`) reads the engine's rows and makes a plan; the engine
(:mod:`vlm_service.engine`) carries it out in this order and decides nothing about who runs:

1. ``stop``: rows that end before the step (their caller left, or their deadline passed); their slots free.
2. ``admit``: waiting requests taken into free rows, each prefilled whole now (its first token chosen) or
   set up to be prefilled in chunks over the next steps.
3. ``chunk``: the row whose prompt gets its next chunk of ``prefill_chunk`` tokens (None: no chunk).
4. ``decode``: the rows that go through this step's forward and choose their next tokens.

A row can end while the plan runs (a whole prefill whose first token is a stop, a failing prefill); the
engine skips a planned row that is no longer there.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_service.engine_request import EngineRequest


@dataclass(frozen=True)
class NewRow:
    """A waiting request taken into row ``slot``; ``chunked``: its prompt is prefilled in chunks, one per
    step between the running rows' decode steps (they are decoding, and it would stall them)."""

    req: EngineRequest
    slot: int
    chunked: bool


@dataclass(frozen=True)
class StepPlan:
    stop: tuple[tuple[int, str], ...] = ()  # (slot, reason: "cancelled" | "deadline")
    admit: tuple[NewRow, ...] = ()
    chunk: int | None = None
    decode: tuple[int, ...] = ()

    @property
    def idle(self) -> bool:
        """Nothing to do: the engine has no work."""
        return not (self.stop or self.admit or self.decode) and self.chunk is None
