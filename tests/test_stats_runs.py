"""Stats exchanges done many at once (``sim.memory.stats_runs``) against the
per-exchange path they stand for (the device without its ``stats_run``): the same guest
memory bytes, stats ring state on both sides, stats, timer, counters, clock and queued
events, through stats that move at every tick, target changes, and a guest that writes
over its own stats ring."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sim.memory import balloon_fleet, stats_runs
from sim.memory.balloon_fleet import GuestBalloon
from sim.virtio.device import VirtioBalloon
from sim.virtio.guestmem import GuestMemory
from sim.virtio.virtqueue import U16, USED_ELEM, _fill_ring
from tests.helpers import numbered_guest, protocol_hypervisor

GIB_KIB = 1 << 20
RING_FIELDS = ("avail_idx", "used_idx", "used_event", "avail_event", "avail_flags", "used_flags", "head_flags")


@dataclass(frozen=True)
class Plan:
    """Guests, their stats period, ticks that move their demand, target changes, and
    an optional write by the guest over one field of its stats ring."""

    deflate_on_oom: tuple[bool, ...]
    event_idx: bool  # VIRTIO_RING_F_EVENT_IDX offered (QEMU's default) or not
    stats_period_s: int
    tick_s: float
    ticks: int
    targets: tuple[tuple[float, int, int], ...]
    poke: tuple[float, int, str, int] | None  # (time, guest, ring field, value)


def _ring_field_at(guest: GuestBalloon, field: str) -> int:
    queue = guest.driver.vqs["statsq"]
    lay, head = queue.lay, next(iter(queue.in_flight), 0)
    return {
        "avail_idx": lay.avail + 2,
        "used_idx": lay.used + 2,
        "used_event": lay.used_event,
        "avail_event": lay.avail_event,
        "avail_flags": lay.avail,
        "used_flags": lay.used,
        "head_flags": lay.desc + 16 * head + 12,  # the stats buffer's descriptor
    }[field]


def _snapshot(guest: GuestBalloon) -> dict[str, object]:
    dev, drv = guest.device, guest.driver
    dq, vq = drv.vqs["statsq"], dev.queues["statsq"]
    return {
        "memory": bytes(guest.mem.buf),
        "device": (
            dev.broken,
            dev.stats,
            dev.stats_updates,
            dev.stats_last_update_s,
            dev.stats_vq_head,
            dev._stats_timer_gen,
            dev._stats_timer_due_s,
            dev._stats_data,
        ),
        "device_ring": (vq.last_avail_idx, vq.used_idx, vq.inuse, vq.signalled_used, vq.signalled_used_valid),
        "driver": (drv._token, drv.stats_work.runs, drv.stats_work.pending, drv.log),
        "driver_ring": (
            dq.num_free,
            dq.free_head,
            dq.avail_idx_shadow,
            dq.last_used_idx,
            dq.num_added,
            list(dq.in_flight.items()),
        ),
        "queued": sorted((at, prio) for at, prio, _, _ in drv.world._queue),
    }


def run(plan: Plan, *, runs: bool) -> dict[str, object]:
    n = len(plan.deflate_on_oom)
    specs = [
        numbered_guest(i, 2 * GIB_KIB, deflate_on_oom=plan.deflate_on_oom[i], stats_phase_s=0.3 * i) for i in range(n)
    ]
    base = np.array([600.0 * 1024 * (i + 1) for i in range(n)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(balloon_fleet, "VirtioBalloon", functools.partial(VirtioBalloon, event_idx=plan.event_idx))
        hv, balloons = protocol_hypervisor(specs, base, plan.stats_period_s)
    if not runs:
        for g in balloons.guests:
            g.device.stats_run = None
    world = hv.world
    events: list[tuple[float, int, int, int]] = [(t, 0, i, mib) for t, i, mib in plan.targets if i < n]
    events += [(k * plan.tick_s, 2, k, 0) for k in range(1, plan.ticks + 1)]
    if plan.poke is not None and plan.poke[1] < n:
        events.append((plan.poke[0], 1, plan.poke[1], 0))
    for at_s, kind, arg, mib in sorted(events):
        world.run(at_s)
        if kind == 0:
            hv.set_target(specs[arg].uuid, mib * 1024)
        elif kind == 1:
            assert plan.poke is not None
            guest = balloons.guests[arg]
            U16.pack_into(guest.mem.buf, _ring_field_at(guest, plan.poke[2]), plan.poke[3])
        else:  # the demand moves at every tick, so the stats do
            hv.advance(at_s, base * (1.0 + 0.2 * math.sin(arg)), np.zeros(n))
    world.run(plan.ticks * plan.tick_s + 7.0)
    return {
        "now": world.now_s,
        "updates": [g.device.stats_updates for g in balloons.guests],
        "guests": [_snapshot(g) for g in balloons.guests],
    }


plans = st.builds(
    Plan,
    deflate_on_oom=st.lists(st.booleans(), min_size=1, max_size=2).map(tuple),
    event_idx=st.booleans(),
    stats_period_s=st.sampled_from([1, 2, 5]),
    tick_s=st.sampled_from([0.5, 3.0, 10.0]),
    ticks=st.integers(1, 6),
    targets=st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(0, 1), st.integers(300, 2048)), max_size=3).map(tuple),
    poke=st.none()
    | st.tuples(st.floats(0.0, 30.0), st.integers(0, 1), st.sampled_from(RING_FIELDS), st.integers(0, 0xFFFF)),
)


@settings(max_examples=150, deadline=None)
@given(plans)
@example(Plan((False,), False, 1, 10.0, 3, (), (5.5, 0, "avail_flags", 1)))  # interrupts off, no EVENT_IDX
@example(Plan((False,), True, 1, 10.0, 3, (), (5.5, 0, "used_event", 3)))  # used_event moved back
@example(Plan((True,), True, 2, 3.0, 4, (), (4.2, 0, "head_flags", 1)))  # the stats buffer made a chain
def test_exchanges_at_once_leave_what_each_exchange_leaves(plan: Plan) -> None:
    assert run(plan, runs=True) == run(plan, runs=False)


def test_a_tick_apart_the_timer_fires_in_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 s stats period and 10 s ticks: the exchanges between two ticks go as runs,
    not one by one, and the guest still answers every period."""
    done: list[int] = []
    real = stats_runs.exchange_run

    def counting(guest: GuestBalloon) -> int:
        done.append(real(guest))
        return done[-1]

    monkeypatch.setattr(stats_runs, "exchange_run", counting)
    plan = Plan((False,), True, 1, 10.0, 3, (), None)
    got = run(plan, runs=True)
    assert max(done) >= 8
    assert got == run(plan, runs=False)
    # The probe's first buffer, then one every 1.001 s (the period after each pop, the
    # work's 1 ms after each firing) from the timer's first firing at 0 s: 37 by 37 s.
    assert got["updates"] == [38]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 8, 16]), st.integers(0, 0xFFFF), st.integers(0, 60), st.integers(0, 0xFFFF))
def test_filling_ring_entries_at_once_writes_what_one_by_one_writes(
    num: int, first_idx: int, count: int, head: int
) -> None:
    """Both of ``_fill_ring``'s ways (struct writes, numpy slots) against one entry at a
    time, wrapping the free-running index and the ring, for avail and used entries."""
    for entry, values in ((U16, (head,)), (USED_ELEM, (head, 0))):
        at_once, one_by_one = GuestMemory(4096, 1), GuestMemory(4096, 1)
        for mem in (at_once, one_by_one):
            mem.buf[:] = bytes(range(256)) * 16
        _fill_ring(at_once.buf, 64, entry, first_idx, count, num - 1, *values)
        for idx in range(first_idx, first_idx + count):
            entry.pack_into(one_by_one.buf, 64 + entry.size * (idx & (num - 1)), *values)
        assert bytes(at_once.buf) == bytes(one_by_one.buf)
