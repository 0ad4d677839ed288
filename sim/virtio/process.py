"""Processes on the World clock: generators that yield what they wait for.

A protocol reads top to bottom as a generator (SimPy's idea, on ``sim.virtio.world.World``)::

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

from sim.virtio.world import World

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

    @property
    def has_waiters(self) -> bool:
        return bool(self._waiters)

    def fire(self) -> None:
        if not self._waiters:  # the common case: the device answered before anyone waited
            return
        waiters, self._waiters = self._waiters, []
        for resume in waiters:
            self.world.schedule(resume, urgent=True)


class Process:
    """One running generator; ``done`` fires when it returns.

    A sleep that ends before anything else is due on the World (strictly earlier than
    the next queued event, and within the span ``World.run`` was asked to cover) is
    taken on the spot: the clock moves and the generator goes on, with no trip through
    the event queue. Nothing else could have run in between, so the order of events
    and every timestamp are those of the queued path."""

    __slots__ = ("_done", "alive", "gen", "then", "world")

    def __init__(self, world: World, gen: ProcessGen, delay_s: float | None = 0.0) -> None:
        """Start ``gen`` after ``delay_s``; ``None`` leaves it to the caller, who calls
        ``run_now`` once it holds the process (a work item must know its running
        process before that process's first step can re-queue it)."""
        self.world = world
        self.gen = gen
        self.alive = True
        self._done: Signal | None = None  # made on first use: most processes are never waited on
        # Called synchronously when ``gen`` returns; a generator it returns runs next in
        # this same process (a work item that re-queued itself), in a loop, not nested.
        self.then: Callable[[], ProcessGen | None] | None = None
        if delay_s is not None:
            world.schedule(self._resume, delay_s)

    def run_now(self) -> None:
        """Run the first step at once (for a process made with ``delay_s=None``)."""
        self._resume()

    @property
    def done(self) -> Signal:
        if self._done is None:
            self._done = Signal(self.world)
        return self._done

    def _resume(self) -> None:
        world, gen = self.world, self.gen
        while True:
            try:
                what = next(gen)
            except StopIteration:
                self.alive = False
                if self._done is not None:
                    self._done.fire()
                then, self.then = self.then, None
                nxt = then() if then is not None else None
                if nxt is None:
                    return
                gen = self.gen = nxt
                self.alive = True
                continue
            if isinstance(what, Signal):
                what.wait(self._resume)
                return
            at_s = world.now_s + what
            if what < 0 or not world.may_jump_to(at_s):
                world.schedule(self._resume, float(what))  # a negative sleep is refused there
                return
            world.now_s = at_s


class WorkItem:
    """A Linux work item: ``queue()`` is a no-op while it is pending, and the function
    runs later on the worker, never inside the caller (an interrupt handler)."""

    def __init__(self, world: World, func: Callable[[], ProcessGen | None], latency_s: float = 0.0) -> None:
        """``func`` returns the generator that does the work, or None when it did all of
        it at once (work that never sleeps: no process, no generator to step)."""
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
            self.running.then = self._next_run
            return True
        self.world.schedule(self._start, self.latency_s + delay_s)
        return True

    def run_at_once(self) -> bool:
        """``queue()`` from the last act of an event (an interrupt handler's caller has
        nothing left to do), and the run itself on the spot where nothing is due before
        it would start (``World.may_jump_to``): the clock moves to its start, as the
        queued run's would. False, with nothing done, where it cannot: pending, running,
        or something due first; the caller then queues."""
        if self.pending or (self.running is not None and self.running.alive):
            return False
        world = self.world
        at_s = world.now_s + self.latency_s
        if not world.may_jump_to(at_s):
            return False
        world.now_s = at_s
        self._start()
        return True

    def _next_run(self) -> ProcessGen | None:
        """The run that follows at once in the same worker (see ``queue``)."""
        self.pending = False
        self.runs += 1
        return self.func()

    def _start(self) -> None:
        if self.running is not None and self.running.alive:
            # A work item never runs concurrently with itself: start after it ends.
            self.running.done.wait(self._start)
            return
        self.pending = False
        self.runs += 1
        gen = self.func()
        if gen is not None:
            self.running = Process(self.world, gen, delay_s=None)
            self.running.run_now()
