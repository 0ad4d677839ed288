"""The simulated host's clock: one object owns ``now_s`` and the event queue, and time
moves only to the next event. Nothing in ``sim/`` reads a wall clock.

Ties break by urgency, then by the order of scheduling, so a replay gives the same
answer twice (SimPy's core does the same with its URGENT priority and event ids).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Event = Callable[[], None]
# A queue entry is the tuple (at_s, priority, seq, event): tuples compare in C, and seq
# is unique, so the event itself is never compared.
_Entry = tuple[float, int, int, Event]


class World:
    """Simulated time and what happens at each instant."""

    def __init__(self, start_s: float = 0.0, *, jumps: bool = True) -> None:
        """``jumps=False`` queues every continuation (``may_jump_to`` always says no):
        the reference the shortcut is tested against."""
        self.now_s = start_s
        self.jumps = jumps
        self._queue: list[_Entry] = []
        self._seq = itertools.count()
        self._horizon_s = float("inf")  # inside ``run``: the time it must not pass
        self._in_event = False  # only an event the World is running may move its clock

    def schedule(self, event: Event, delay_s: float = 0.0, *, urgent: bool = False) -> None:
        """Run ``event`` ``delay_s`` from now; urgent events (interrupts) go first at a tie."""
        if delay_s < 0:
            raise ValueError(f"delay_s(={delay_s}) must be >= 0")
        heapq.heappush(self._queue, (self.now_s + delay_s, 0 if urgent else 1, next(self._seq), event))

    def schedule_at(self, at_s: float, event: Event) -> None:
        """Run ``event`` at the absolute time ``at_s`` (not before now)."""
        if at_s < self.now_s:
            raise ValueError(f"at_s(={at_s}) is before now(={self.now_s})")
        heapq.heappush(self._queue, (at_s, 1, next(self._seq), event))

    def every(self, period_s: float, event: Event, *, first_s: float = 0.0) -> None:
        """Run ``event`` at ``first_s`` from now and then every ``period_s``."""
        if period_s <= 0:
            raise ValueError(f"period_s(={period_s}) must be > 0")

        def tick() -> None:
            event()
            self.schedule(tick, period_s)

        self.schedule(tick, first_s)

    def may_jump_to(self, at_s: float) -> bool:
        """Whether the event running now may move the clock to ``at_s`` and go on
        itself (instead of queuing its continuation): true iff nothing queued is due at
        or before ``at_s`` (a tie would run the earlier-scheduled event first) and
        ``run`` was not told to stop earlier. Code called from outside an event (a
        test poking a device) never moves the clock."""
        queue = self._queue
        return self._in_event and self.jumps and at_s <= self._horizon_s and (not queue or at_s < queue[0][0])

    def jump_limits(self) -> tuple[float, float] | None:
        """``may_jump_to``'s bounds for a run of jumps decided at once: (the horizon,
        which a jump may reach; the next queued event's time, which it must stay
        strictly before), or None where no jump may be taken."""
        if not (self._in_event and self.jumps):
            return None
        return self._horizon_s, self.peek()

    def peek(self) -> float:
        """When the next event is due; infinity if none is."""
        return self._queue[0][0] if self._queue else float("inf")

    def step(self) -> None:
        """Advance to the next event and run it."""
        at_s, _, _, event = heapq.heappop(self._queue)
        self.now_s = at_s
        self._in_event = True
        try:
            event()
        finally:
            self._in_event = False

    def run(self, until_s: float) -> None:
        """Run every event due at or before ``until_s``, then stop the clock there."""
        outer, self._horizon_s = self._horizon_s, min(self._horizon_s, until_s)
        try:
            while self.peek() <= until_s:
                self.step()
        finally:
            self._horizon_s = outer
        self.now_s = until_s
