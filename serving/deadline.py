"""One deadline, edge to model (docs/architecture.md "The failure model").

Every servicer builds a `Deadline` from its call's time remaining (`from_context`) and hands that one object
down: the orchestrator gives each downstream call `left()`, the audio batcher drops a request whose deadline
passes while it waits and gives its backend the batch's `latest` (Triton's call timeout), the VLM Triton
client makes `remaining()` its stream timeout, and the VLM engine, which keeps a `time.monotonic()` instant per
row, gets `at`.
"""
from __future__ import annotations

import time
from typing import Iterable

from serving.errors import DeadlineExceeded

# The deadline of a call whose caller sets none (the orchestrator's, the client's, a Triton backend's call).
DEFAULT_DEADLINE_SECONDS = 600.0


class Deadline:
    """An instant on the monotonic clock (`at`), or none (`at is None`: no deadline)."""

    __slots__ = ("at",)

    def __init__(self, at: float | None = None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(None if seconds is None else time.monotonic() + seconds)

    @classmethod
    def latest(cls, deadlines: "Iterable[Deadline | None]") -> "Deadline":
        """The last of several callers' deadlines (none if any caller has none): work done for all of
        them is wanted until then."""
        instants = [d.at if d is not None else None for d in deadlines]
        return cls(None if not instants or None in instants else max(instants))

    @classmethod
    def from_context(cls, context, default_seconds: float | None = None) -> "Deadline":
        """The call's deadline (`context.time_remaining()`), else `default_seconds` from now, else none."""
        remaining = context.time_remaining() if context is not None else None
        return cls.after(remaining if remaining is not None else default_seconds)

    def remaining(self) -> float | None:
        """Seconds left (0 once passed), None without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def left(self) -> float | None:
        """Seconds left for a call made now; raises DeadlineExceeded once the deadline has passed."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded()
        return remaining

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining()})"
