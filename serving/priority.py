"""Which waiting request goes next when interactive and batch work share a queue (every stage uses this one
policy: the orchestrator's admission, the VLM scheduler's admission, the audio batcher).

Interactive work (someone waits for its first sound) goes before batch work (a folder or dataset run); within
a class, the stage's own order (arrival, or the admission's fairness across streams). Nothing running is
preempted: a batch row or batch call that started finishes.

Aging, counted in turns rather than seconds (so it holds whatever a turn costs, and a test can check it
without a clock): while batch work waits, at most `batch_aging` interactive requests are served in a row;
then the oldest batch request goes. The bound: while both classes wait, batch work gets at least one turn in
every `batch_aging + 1`, so the k-th batch request in line is served within k * (batch_aging + 1) turns of
that stage, however much interactive work keeps arriving.

Where work shares slots (the VLM's decode rows, `admit`), batch work also yields capacity: outside its aging
turn a batch request starts only while no interactive request holds a slot and more than `reserved` slots
stay free after it, so an interactive request that arrives finds a slot at the next step and decodes beside
fewer batch rows (each decode step costs more with every row). Batch work then waits, beyond the aging bound,
at most until the interactive requests holding slots finish (each is bounded by its token budget and
deadline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from serving.config import setting

INTERACTIVE, BATCH = "interactive", "batch"
PRIORITIES = (INTERACTIVE, BATCH)
T = TypeVar("T")


def _at_least_one(value: int) -> None:
    if value < 1:
        raise ValueError("must be at least 1 (batch work would never wait for interactive work otherwise)")


@dataclass(frozen=True)
class PriorityOptions:
    batch_aging: int = setting(4, "interactive requests served in a row while batch work waits; then the oldest "
                               "batch request goes (batch work gets at least 1 turn in every N+1)",
                               check=_at_least_one)


class PriorityOrder:
    """The order of one queue (state: the interactive turns taken since batch work last had one). Not
    thread-safe: each caller uses it under the lock (or on the event loop) that guards its queue."""

    def __init__(self, batch_aging: int = PriorityOptions.batch_aging, reserved: int = 0) -> None:
        _at_least_one(batch_aging)
        if reserved < 0:
            raise ValueError("reserved slots must not be negative")
        self.batch_aging = batch_aging
        self.reserved = reserved  # slots of `admit` that batch work leaves free (outside its aging turn)
        self._overtakes = 0

    def choose(self, waiting: Sequence[T], priority_of: Callable[[T], str],
               rank: Callable[[T], Any] | None = None) -> T | None:
        """The item that goes next (None if none waits), without taking the turn. `waiting` is in arrival
        order; `rank` orders items within a class (default: arrival)."""
        interactive = [item for item in waiting if priority_of(item) != BATCH]
        batch = [item for item in waiting if priority_of(item) == BATCH]
        if interactive and (not batch or self._overtakes < self.batch_aging):
            return min(interactive, key=rank) if rank else interactive[0]
        if batch:
            return min(batch, key=rank) if rank else batch[0]
        return None

    def took(self, priority: str, batch_waiting: bool) -> None:
        """A request of `priority` was served; `batch_waiting`: batch work was passed over for it."""
        if priority == BATCH:
            self._overtakes = 0
        elif batch_waiting:
            self._overtakes += 1

    def pick(self, waiting: Sequence[T], priority_of: Callable[[T], str],
             rank: Callable[[T], Any] | None = None) -> T | None:
        """`choose`, and the turn taken."""
        chosen = self.choose(waiting, priority_of, rank)
        if chosen is not None:
            self.took(priority_of(chosen), any(priority_of(item) == BATCH for item in waiting if item is not chosen))
        return chosen

    def take(self, waiting: list[T], count: int, priority_of: Callable[[T], str]) -> list[T]:
        """Up to `count` items removed from `waiting`, in the order they go."""
        taken: list[T] = []
        while waiting and len(taken) < count:
            chosen = self.pick(waiting, priority_of)
            del waiting[next(i for i, item in enumerate(waiting) if item is chosen)]  # by identity, not ==
            taken.append(chosen)
        return taken

    def admit(self, waiting: list[T], free: int, capacity: int, interactive_holding: int,
              priority_of: Callable[[T], str]) -> list[T]:
        """Items removed from `waiting` to start now in `free` of `capacity` slots, in order, batch work
        yielding slots as the module says (`interactive_holding`: slots interactive requests hold now)."""
        reserve = min(self.reserved, capacity - 1)  # never every slot: batch work must always be able to run
        taken: list[T] = []
        while waiting and len(taken) < free:
            chosen = self.choose(waiting, priority_of)
            if priority_of(chosen) == BATCH and self._overtakes < self.batch_aging:  # not its aging turn
                if interactive_holding > 0 or free - len(taken) <= reserve:
                    break
            taken += self.take(waiting, 1, priority_of)
            interactive_holding += priority_of(chosen) != BATCH
        return taken
