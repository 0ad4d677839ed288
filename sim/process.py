"""Processes on the World clock: generators that yield what they wait for.

A protocol reads top to bottom as a generator (SimPy's idea, on ``sim.world.World``)::

    def tell_host(self, vq, pfns):
        vq.add_outbuf(...); vq.kick()
        while vq.get_buf() is None:
            yield self.acked          # a Signal: wait until the device interrupts

A process yields a number (sleep that many simulated seconds) or a ``Signal`` (wait
until it fires). Signals fire through the World queue as urgent events, so an
interrupt resumes its waiter before ordinary events due at the same instant.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from sim.world import World

ProcessGen = Generator["float | Signal", None, None]


class Signal:
    """An edge that processes wait on (a wait queue, like Linux's ``wait_event``).

    Firing wakes every current waiter; a waiter that arrives later waits for the next
    fire, so a process re-checks its condition before yielding."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._waiters: list[Callable[[], None]] = []

    def wait(self, resume: Callable[[], None]) -> None:
        self._waiters.append(resume)

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for resume in waiters:
            self.world.schedule(resume, urgent=True)


class Process:
    """One running generator; ``done`` fires when it returns."""

    def __init__(self, world: World, gen: ProcessGen, delay_s: float | None = 0.0) -> None:
        """Start ``gen`` after ``delay_s``; ``None`` runs its first step right now."""
        self.world = world
        self.gen = gen
        self.alive = True
        self.done = Signal(world)
        self.on_exit: Callable[[], None] | None = None  # called synchronously when ``gen`` returns
        if delay_s is None:
            self._resume()
        else:
            world.schedule(self._resume, delay_s)

    def _resume(self) -> None:
        try:
            what = next(self.gen)
        except StopIteration:
            self.alive = False
            self.done.fire()
            if self.on_exit is not None:
                self.on_exit()
            return
        if isinstance(what, Signal):
            what.wait(self._resume)
        else:
            self.world.schedule(self._resume, float(what))


class WorkItem:
    """A Linux work item: ``queue()`` is a no-op while it is pending, and the function
    runs later on the worker, never inside the caller (an interrupt handler)."""

    def __init__(self, world: World, func: Callable[[], ProcessGen], latency_s: float = 0.0) -> None:
        self.world = world
        self.func = func
        self.latency_s = latency_s
        self.pending = False
        self.running: Process | None = None
        self.runs = 0

    def queue(self, delay_s: float = 0.0) -> bool:
        """Queue the work; False if it was already pending (``queue_work`` semantics).

        A work function re-queuing itself with no delay runs again the moment it returns
        (what the worker thread does next), without a trip through the event queue."""
        if self.pending:
            return False
        self.pending = True
        if delay_s == 0 and self.latency_s == 0 and self.running is not None and self.running.alive:
            self.running.on_exit = self._start
            return True
        self.world.schedule(self._start, self.latency_s + delay_s)
        return True

    def _start(self) -> None:
        if self.running is not None and self.running.alive:
            # A work item never runs concurrently with itself: start after it ends.
            self.running.done.wait(self._start)
            return
        self.pending = False
        self.runs += 1
        self.running = Process(self.world, self.func(), delay_s=None)
