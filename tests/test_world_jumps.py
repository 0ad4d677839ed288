"""The protocol model's clock shortcut changes nothing observable.

A sleep or a device push that ends before anything else is due moves the World clock
on the spot instead of queuing a continuation (``World.may_jump_to``). These tests run
the same fleet twice, once with the shortcut and once with every continuation queued
(``World(jumps=False)``), and compare everything a host, a guest or a replay can see:
``actual`` with the time of each write, BALLOON_CHANGE events, the stats samples, the
driver's log, the bytes of guest memory (rings, PFN array, stats buffer), the Fleet's
memory figures and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.virtio.process import Process, ProcessGen
from sim.virtio.world import World
from tests.helpers import numbered_guest, play, protocol_hypervisor

GIB_KIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Guests and what happens to them: (time, guest, target in MiB) targets, and the
    daemon-like ticks at which the Fleet advances."""

    deflate_on_oom: tuple[bool, ...]
    reporting: tuple[bool, ...]
    hint: tuple[bool, ...]
    stats_period_s: int
    targets: tuple[tuple[float, int, int], ...]
    tick_s: float
    demand_mib: tuple[int, ...]


def run(plan: Plan, *, jumps: bool, one_order: bool = False) -> dict[str, object]:
    n = len(plan.deflate_on_oom)
    specs = [
        numbered_guest(
            i,
            2 * GIB_KIB,
            deflate_on_oom=plan.deflate_on_oom[i],
            reporting=plan.reporting[i],
            free_page_hint=plan.hint[i],
        )
        for i in range(n)
    ]
    demand = np.array([m * 1024.0 for m in plan.demand_mib[:n]])
    hv, balloons = protocol_hypervisor(specs, demand, plan.stats_period_s, jumps=jumps)
    world = hv.world
    targets = [(t, i, mib * 1024) for t, i, mib in plan.targets if i < n]
    play(hv, demand, targets, plan.tick_s, 8.0, 10.0, one_order=one_order)
    hv.advance(10.0, demand, np.zeros(n))
    guests = balloons.guests
    return {
        "now": world.now_s,
        "actual_log": [g.device.actual_log for g in guests],
        "balloon_change": [g.device.balloon_change_events for g in guests],
        "stats": [(g.device.stats, g.device.stats_updates, g.device.stats_last_update_s) for g in guests],
        "driver_log": [g.driver.log for g in guests],
        "driver": [
            (g.driver.num_pages, g.driver.puff_count, g.driver.cpu_s, g.driver.update_work.runs) for g in guests
        ],
        "memory": [bytes(g.mem.buf) for g in guests],
        "host": [(g.host.released_bytes, g.host.discard_calls, g.host.willneed_calls) for g in guests],
        "balloon_kib": balloons.balloon_kib.tolist(),
        "fleet": {name: values.tolist() for name, values in hv.fleet.stats().items()},
        "poll": (balloons.last_update_s.tolist(), {k: v.tolist() for k, v in balloons.stats.items()}),
    }


plans = st.builds(
    Plan,
    deflate_on_oom=st.tuples(st.booleans(), st.booleans()),
    reporting=st.tuples(st.booleans(), st.booleans()),
    hint=st.tuples(st.booleans(), st.booleans()),
    stats_period_s=st.sampled_from([0, 1, 5]),
    targets=st.lists(
        st.tuples(st.floats(0.0, 8.0), st.integers(0, 1), st.integers(200, 2048)), min_size=1, max_size=6
    ).map(tuple),
    tick_s=st.sampled_from([0.5, 2.0, 10.0]),
    demand_mib=st.tuples(st.integers(100, 1900), st.integers(100, 1900)),
)


@settings(max_examples=25, deadline=None)
@given(plans)
def test_jumping_the_clock_changes_nothing_observable(plan: Plan) -> None:
    assert run(plan, jumps=True) == run(plan, jumps=False)


@settings(max_examples=25, deadline=None)
@given(plans)
def test_each_guest_on_its_own_clock_changes_nothing_observable(plan: Plan) -> None:
    """Each guest's events on its own clock, a guest jumping past the others' events
    (``World.guest_world``), against every event in one global order (``World.step``):
    the guests never touch one another, so the order between them is not observable."""
    assert run(plan, jumps=True) == run(plan, jumps=True, one_order=True)


def test_a_big_inflate_jumps_and_still_lands_on_the_queued_instants() -> None:
    plan = Plan((False,), (False,), (False,), 5, ((0.0, 0, 512),), 10.0, (300,))
    jumped, queued = run(plan, jumps=True), run(plan, jumps=False)
    assert jumped == queued
    log = jumped["actual_log"]
    assert isinstance(log, list)
    # ~1.5 GiB in 1 MiB (256-page) requests, each its own instant; the guest kernel's reserve
    # (sim.memory.kernel, 6.1 watermarks) stops the last request a few pages short of the target.
    requests, final_pages = log[0], log[0][-1][1]
    assert len({t for t, _ in requests}) == len(requests) == -(-final_pages // 256)
    assert 1500 * 256 < final_pages <= 1536 * 256


@pytest.mark.parametrize("jumps", [True, False])
def test_no_jump_past_a_queued_event(jumps: bool) -> None:
    """A sleeping process wakes exactly when it asked to, whether it jumped or not, and
    an event due in between still runs between."""
    world, seen = World(jumps=jumps), []

    def sleeper() -> ProcessGen:
        for _ in range(3):
            yield 0.3
            seen.append(("sleeper", world.now_s))

    world.schedule(lambda: seen.append(("timer", world.now_s)), 0.5)
    world.schedule(lambda: Process(world, sleeper(), delay_s=None).run_now())
    world.run(0.7)
    assert world.now_s == 0.7
    assert seen == [("sleeper", 0.3), ("timer", 0.5), ("sleeper", 0.3 + 0.3)]
    world.run(2.0)
    assert seen[3:] == [("sleeper", 0.3 + 0.3 + 0.3)]


@pytest.mark.parametrize("jumps", [True, False])
def test_a_barriers_sleep_never_jumps_past_a_guests_event(jumps: bool) -> None:
    """A process on the World itself (a barrier's) wakes after a guest's event due
    before it, on the guest's clock, as with one clock for all."""
    world, seen = World(jumps=jumps), []
    guest = world.guest_world()

    def sleeper() -> ProcessGen:
        yield 0.5
        seen.append(("barrier", world.now_s))

    guest.schedule(lambda: seen.append(("guest", guest.now_s)), 0.2)
    world.schedule(lambda: Process(world, sleeper(), delay_s=None).run_now())
    world.run(1.0)
    assert seen == [("guest", 0.2), ("barrier", 0.5)]


def test_outside_an_event_the_clock_never_jumps() -> None:
    world = World()
    assert not world.may_jump_to(1.0)  # a test or a caller poking a device between events
    flags: list[bool] = []
    world.schedule(lambda: flags.append(world.may_jump_to(world.now_s + 1.0)))
    world.schedule(lambda: None, 0.5)
    world.run(0.1)
    assert flags == [False]  # the event at 0.5 comes first


@pytest.mark.parametrize("jumps", [True, False])
def test_run_never_ends_past_its_horizon(jumps: bool) -> None:
    world = World(jumps=jumps)
    stamps: list[float] = []

    def ticker() -> ProcessGen:
        while True:
            yield 0.25
            stamps.append(world.now_s)

    world.schedule(lambda: Process(world, ticker(), delay_s=None).run_now())
    world.run(1.1)
    assert world.now_s == 1.1 and stamps == [0.25, 0.5, 0.75, 1.0]


def test_a_negative_sleep_is_refused_even_when_the_clock_could_jump() -> None:
    world = World()

    def bad() -> ProcessGen:
        yield -1.0

    world.schedule(lambda: Process(world, bad(), delay_s=None).run_now())
    with pytest.raises(ValueError, match="delay_s"):
        world.run(1.0)
