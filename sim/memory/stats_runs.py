"""A guest's stats exchanges done many at once, where nothing can come between them.

Every stats period QEMU's timer hands the held buffer back, the guest's stats work runs
from the interrupt, gathers, reclaims the buffer and posts it again, and the device pops
it and re-arms the timer: about twenty Python calls through both sides of the ring (two
exchanges per guest per 10 s tick were most of a protocol replay's time, issue 13). When
the ring is steady and nothing is due before the exchanges end (``World.jump_limits``:
the rule of ``World.may_jump_to`` and ``may_repeat_to``, exchange by exchange), every one
goes the same way. A guest's stats move only when its Fleet row does, which nothing does
between two of the guest's events, so the exchanges after the first (which brings the
stats as they stand) bring the same bytes; each is gathered all the same, and the run
ends before one that would not. The rings, stats, counters and timer are then set to
what the exchanges would have left, in one step each.

The per-exchange path stays the reference: ``tests/test_stats_runs.py`` holds the two to
the same bytes, ring state on both sides, counters, timer and clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.memory.balloon_fleet import GuestBalloon


def exchange_run(guest: GuestBalloon) -> int:
    """From the stats timer's firing (``VirtioBalloon._stats_poll_cb``): the exchanges
    done at once, the clock at the last one's pop and the timer re-armed after it, or
    0 with nothing changed where not even the first could be."""
    device, driver = guest.device, guest.driver
    world = driver.world
    limits = world.jump_limits()
    head = device.stats_steady_head()
    if limits is None or head is None or not driver.stats_reusable(head):
        return 0
    horizon_s, before_s = limits
    repeats = horizon_s < float("inf")  # ``may_repeat_to``: a timer re-fires only up to a finite horizon
    work_s, period_s = driver.stats_work.latency_s, float(device.stats_poll_interval_s)
    fired_s, count, packed = world.now_s, 0, b""
    while True:
        gather_s = fired_s + work_s  # ``WorkItem.run_at_once``: the work starts its latency after the interrupt
        if not (gather_s <= horizon_s and gather_s < before_s):
            break
        world.now_s = gather_s  # the gather reads the guest as it stands then
        got = driver.gather_stats()
        if (got != packed) if count else (len(got) != driver.stats_len):  # the device reads what was written
            break
        count, packed, last_s = count + 1, got, gather_s
        fired_s = gather_s + period_s  # ``_stats_timer_mod`` from the pop
        if not (repeats and fired_s <= horizon_s and fired_s < before_s):
            break
    if not count:
        world.now_s = fired_s
        return 0
    world.now_s = last_s
    driver.stats_gathered_at_once(count, head, packed)
    device.stats_exchanged_at_once(count, packed)
    return count
