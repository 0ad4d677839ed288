"""The simulated host's clock: a ``World`` owns ``now_s`` and an event queue, and time
moves only to the next event; each protocol-level guest has a clock of its own under it
(``guest_world``). Nothing in ``sim/`` reads a wall clock.

Ties break by urgency, then by the order of scheduling (one counter for the World and
its guests' clocks), so a replay gives the same answer twice (SimPy's core does the same
with its URGENT priority and event ids).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator

Event = Callable[[], None]
# A queue entry is the tuple (at_s, priority, seq, event): tuples compare in C, and seq
# is unique, so the event itself is never compared.
_Entry = tuple[float, int, int, Event]


class World:
    """Simulated time and what happens at each instant.

    A guest's own events (its device's timers, its driver's work and sleeps) may go on
    a clock of their own, ``guest_world()``: the guests never touch one another between
    two events of this World (the replay's tick, a scenario's step), so their events need
    no common order, and a guest whose next own event is far off may jump its clock
    (``may_jump_to``) while other guests' events fall in between. This World's events
    stay barriers: before each, every guest's events due before it (by the queue's
    order: time, urgency, then scheduling, on one shared counter) run, and every guest's
    clock stands at its instant while it runs. Guest code such an event calls (a target
    set at the tick, the OOM notifier inside the Fleet's advance) is outside any event of
    the guest's clock: it queues its continuations there, never moving the tick's clock
    (the notifier's deflate once moved it, and every later tick with it). ``step`` keeps
    the one global order."""

    def __init__(self, start_s: float = 0.0, *, jumps: bool = True, seq: Iterator[int] | None = None) -> None:
        """``jumps=False`` queues every continuation (``may_jump_to`` always says no):
        the reference the shortcut is tested against."""
        self.now_s = start_s
        self._jumps = jumps
        self._queue: list[_Entry] = []
        self._seq = seq if seq is not None else itertools.count()
        self._horizon_s = float("inf")  # inside ``run``: the time it must not pass
        self._barrier_s = float("inf")  # a guest's clock: when the next barrier is due (a jump stops short)
        self._in_event = False  # only an event the World is running may move its clock
        self._guests: list[World] = []

    @property
    def jumps(self) -> bool:
        return self._jumps

    @jumps.setter
    def jumps(self, value: bool) -> None:
        self._jumps = value
        for guest in self._guests:
            guest.jumps = value

    def guest_world(self) -> World:
        """A clock for one guest's own events (see the class); its owner schedules on it
        as on this World, which runs it."""
        guest = World(self.now_s, jumps=self._jumps, seq=self._seq)
        self._guests.append(guest)
        return guest

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
        itself (instead of queuing its continuation): true iff nothing queued on this
        clock or a guest's (a barrier passes no guest), and no barrier, is due at or
        before ``at_s`` (a tie would run the earlier-scheduled event first) and ``run``
        was not told to stop earlier. Code called from outside an event (a test poking
        a device) never moves the clock."""
        queue = self._queue
        return (
            self._in_event
            and self._jumps
            and at_s <= self._horizon_s
            and at_s < self._barrier_s
            and (not queue or at_s < queue[0][0])
            and (not self._guests or at_s < self.peek())
        )

    def may_repeat_to(self, at_s: float) -> bool:
        """``may_jump_to`` for an event that re-arms itself (a periodic timer): only up to
        a finite horizon, so a ``step`` outside ``run`` runs it once, not forever."""
        return self._horizon_s < float("inf") and self.may_jump_to(at_s)

    def jump_limits(self) -> tuple[float, float] | None:
        """``may_jump_to``'s bounds for a run of jumps decided at once: (the horizon,
        which a jump may reach; the next queued event's or barrier's time, which it must
        stay strictly before), or None where no jump may be taken."""
        if not (self._in_event and self._jumps):
            return None
        return self._horizon_s, min(self.peek(), self._barrier_s)

    def peek(self) -> float:
        """When the next event is due, on this clock or a guest's; infinity if none is."""
        due = self._queue[0][0] if self._queue else float("inf")
        for guest in self._guests:
            if guest._queue and guest._queue[0][0] < due:
                due = guest._queue[0][0]
        return due

    def step(self, until_s: float = float("inf")) -> None:
        """Advance to the next event, a guest's included, and run it: the one global
        order, a guest's jumps bounded by every other clock's next event and by
        ``until_s`` (as ``run``'s horizon bounds them)."""
        clock, first = self, self._queue[0] if self._queue else None
        for guest in self._guests:
            if guest._queue and (first is None or guest._queue[0] < first):
                clock, first = guest, guest._queue[0]
        if first is None:
            raise IndexError("step: nothing is queued")
        outer, self._horizon_s = self._horizon_s, min(self._horizon_s, until_s)
        try:
            if clock is self:
                self._step()
                return
            others_s = self._queue[0][0] if self._queue else float("inf")
            for guest in self._guests:
                if guest is not clock and guest._queue and guest._queue[0][0] < others_s:
                    others_s = guest._queue[0][0]
            clock._barrier_s, clock._horizon_s = others_s, self._horizon_s
            try:
                clock._step()
            finally:
                clock._barrier_s, clock._horizon_s = float("inf"), float("inf")
            self.now_s = clock.now_s
        finally:
            self._horizon_s = outer

    def _step(self) -> None:
        at_s, _, _, event = heapq.heappop(self._queue)
        self.now_s = at_s
        for guest in self._guests:
            guest.now_s = at_s
        self._in_event = True
        try:
            event()
        finally:
            self._in_event = False

    def run(self, until_s: float) -> None:
        """Run every event due at or before ``until_s``, then stop every clock there."""
        outer, self._horizon_s = self._horizon_s, min(self._horizon_s, until_s)
        try:
            while True:
                queue = self._queue
                barrier = queue[0] if queue and queue[0][0] <= until_s else None
                for guest in self._guests:
                    guest._run_before(barrier, self._horizon_s)
                if barrier is None:
                    break
                self._step()
        finally:
            self._horizon_s = outer
        self.now_s = until_s
        for guest in self._guests:
            guest.now_s = until_s

    def _run_before(self, barrier: _Entry | None, horizon_s: float) -> None:
        """A guest's clock: run its events due before ``barrier`` (the queue's order:
        entries compare as (time, urgency, seq), seq shared, so never the event), or
        without one every event at or before ``horizon_s``."""
        queue = self._queue
        self._horizon_s = horizon_s
        if barrier is None:
            self._barrier_s = float("inf")
            while queue and queue[0][0] <= horizon_s:
                self._step()
        else:
            self._barrier_s = barrier[0]
            while queue and queue[0] < barrier:
                self._step()
        self._barrier_s, self._horizon_s = float("inf"), float("inf")
