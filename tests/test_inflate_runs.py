"""Inflate and deflate requests done many at once (``sim.memory.inflate_runs``) against
the per-request path they stand for (the driver without its ``fill_run`` and
``leak_run``): the same guest
memory bytes, ring state on both sides, Fleet arrays, clock and queued events, ``actual``
updates and BALLOON_CHANGE events, driver, memory manager and host counters, through
inflates, deflates and whatever comes between (stats timers, target changes, ticks)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from sim.memory import inflate_runs
from sim.memory.balloon_fleet import GuestBalloon, ProtocolBalloons
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.backing import RamBacking
from sim.virtio.world import World
from tests.helpers import play, protocol_hypervisor

pytestmark = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")

GIB_KIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """One guest and what happens to it: (time, target in MiB) changes, host ticks."""

    ram_gib: int
    demand_mib: int
    cache_mib: int
    deflate_on_oom: bool
    inhibited: bool
    hugepages: bool
    stats_period_s: int
    targets: tuple[tuple[float, int], ...]
    tick_s: float


def _snapshot(hv: SimHypervisor, world: World) -> dict[str, object]:
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    g = balloons.guests[0]
    drv, dev, mm = g.driver, g.device, g.mm
    dq, vq = drv.vqs["inflateq"], dev.queues["inflateq"]
    dq_defl, vq_defl = drv.vqs["deflateq"], dev.queues["deflateq"]
    return {
        "now": world.now_s,
        "queue": sorted((at, prio, seq) for at, prio, seq, _ in world._queue),
        "memory": bytes(g.mem.buf),
        "actual": (dev.actual, dev.actual_log, dev.balloon_change_events, dev.balloon_change_window()),
        "pending": dev._event_pending,
        "stats": (dev.stats, dev.stats_updates, dev.stats_last_update_s),
        "driver": (
            drv.num_pages,
            drv.fill_unacked_pages,
            drv._token,
            drv.cpu_s,
            drv.puff_count,
            drv.puff_sleep_s,
            drv.update_work.runs,
            drv.update_work.pending,
            drv.log,
            sorted(drv.done_tokens),
            np.concatenate(drv.balloon).tolist() if drv.balloon else [],
        ),
        "driver_queues": [
            (q.num_free, q.free_head, q.avail_idx_shadow, q.last_used_idx, q.num_added, dict(q.in_flight))
            for q in (dq, dq_defl)
        ],
        "device_queues": [
            (q.last_avail_idx, q.used_idx, q.inuse, q.signalled_used, q.signalled_used_valid) for q in (vq, vq_defl)
        ],
        "host": (g.host.released_bytes, g.host.discard_calls, g.host.willneed_calls, g.host.partial_dropped),
        "mm": (
            mm._next_pfn,
            mm._run_top,
            mm._released_seen,
            [a.tolist() for a in mm._free_stack],
            mm._free_stack_pages,
        ),
        "spare": (mm._spare_kib, mm._spare_version, balloons.fleet_version),
        "balloons": (
            balloons.balloon_kib.tolist(),
            balloons.held_kib.tolist(),
            balloons.managed_removed_kib.tolist(),
        ),
        "fleet": {k: v.tolist() for k, v in vars(hv.fleet).items() if isinstance(v, np.ndarray)},
    }


def run(plan: Plan, *, at_once: bool) -> dict[str, object]:
    spec = GuestSpec(
        uuid="00000000-0000-0000-0000-000000000001",
        name="g",
        ram_kib=plan.ram_gib * GIB_KIB,
        deflate_on_oom=plan.deflate_on_oom,
        backing=RamBacking("hugetlbfs", 2 << 20) if plan.hugepages else RamBacking(),
    )
    demand = np.array([plan.demand_mib * 1024.0])
    hv, balloons = protocol_hypervisor([spec], demand, plan.stats_period_s)
    guest = balloons.guests[0]
    guest.host.inhibited = plan.inhibited
    hv.fleet.cache[0] = min(plan.cache_mib * 1024.0, hv.fleet.cache[0] + plan.cache_mib * 1024.0)
    if not at_once:
        guest.driver.fill_run = guest.driver.leak_run = None
    targets = [(t, 0, min(mib, plan.ram_gib * 1024) * 1024) for t, mib in plan.targets]
    play(hv, demand, targets, plan.tick_s, 6.0, 8.0)
    return _snapshot(hv, hv.world)


plans = st.builds(
    Plan,
    ram_gib=st.sampled_from([1, 2, 4]),
    demand_mib=st.integers(64, 900),
    cache_mib=st.integers(0, 1500),
    deflate_on_oom=st.booleans(),
    inhibited=st.booleans(),
    hugepages=st.sampled_from([False, False, False, True]),
    stats_period_s=st.sampled_from([0, 1, 2]),
    targets=st.lists(st.tuples(st.floats(0.0, 6.0), st.integers(100, 4096)), min_size=1, max_size=5).map(tuple),
    tick_s=st.sampled_from([0.25, 1.0, 10.0]),
)


# A big inflate first, then targets back up (deflates), some cutting into a deflate
# still going: every deflate flag at once (DEFLATE_ON_OOM under a demand that may OOM,
# inhibited discards, hugetlbfs backing, stats timers, host ticks).
deflate_plans = st.builds(
    Plan,
    ram_gib=st.sampled_from([1, 2, 4]),
    demand_mib=st.integers(64, 900),
    cache_mib=st.integers(0, 1500),
    deflate_on_oom=st.booleans(),
    inhibited=st.booleans(),
    hugepages=st.sampled_from([False, True]),
    stats_period_s=st.sampled_from([0, 1, 2]),
    targets=st.tuples(
        st.tuples(st.just(0.0), st.integers(100, 400)),
        st.lists(st.tuples(st.floats(1.0, 6.0), st.integers(300, 4096)), min_size=1, max_size=4),
    ).map(lambda first_rest: (first_rest[0], *first_rest[1])),
    tick_s=st.sampled_from([0.25, 1.0, 10.0]),
)


@settings(max_examples=40, deadline=None)
@given(plans)
def test_runs_at_once_change_nothing_observable(plan: Plan) -> None:
    assert run(plan, at_once=True) == run(plan, at_once=False)


@settings(max_examples=40, deadline=None)
@given(deflate_plans)
def test_deflate_runs_at_once_change_nothing_observable(plan: Plan) -> None:
    assert run(plan, at_once=True) == run(plan, at_once=False)


def counted_runs(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[float, int]]:
    """Every later call of ``inflate_runs.<name>`` (``fill_run``, ``leak_run``), as (the
    clock, the pages its run moved), in call order."""
    runs: list[tuple[float, int]] = []
    real = getattr(inflate_runs, name)

    def counting(guest: GuestBalloon, diff: int) -> int:
        pages: int = real(guest, diff)
        runs.append((guest.driver.world.now_s, pages))
        return pages

    monkeypatch.setattr(inflate_runs, name, counting)
    return runs


def test_a_big_inflate_goes_mostly_at_once_and_stops_at_every_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """1.5 GiB with a stats timer every second, host ticks, a target change mid-way and
    a deflate back: runs cover most requests, stop before each event, and the result is
    the per-request path's."""
    taken = counted_runs(monkeypatch, "fill_run")
    plan = Plan(4, 300, 200, False, False, False, 1, ((0.0, 2560), (0.9, 2048), (3.0, 4096)), 0.5)
    fast = run(plan, at_once=True)
    assert fast == run(plan, at_once=False)
    assert sum(p for _, p in taken) > 0.9 * 2048 * 256
    assert len([p for _, p in taken if p]) > 3  # the stats timer and the ticks cut the runs


def test_a_big_deflate_goes_mostly_at_once_and_stops_at_every_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 GiB inflate, then a deflate to 3.5 GiB cut by a target change back to 2 GiB
    and then to 4 GiB, with a stats timer every second and host ticks: deflate runs
    cover most of the deflate requests, stop before each event, and the result is the
    per-request path's, on DEFLATE_ON_OOM and hugetlbfs guests too."""
    given_back = counted_runs(monkeypatch, "leak_run")
    for deflate_on_oom, hugepages in ((False, False), (True, True)):
        given_back.clear()
        targets = ((0.0, 1024), (4.0, 3584), (4.3, 2048), (5.0, 4096))
        plan = Plan(4, 300, 200, deflate_on_oom, False, hugepages, 1, targets, 0.5)
        fast = run(plan, at_once=True)
        assert fast == run(plan, at_once=False)
        actual_log = fast["actual"][1]  # type: ignore[index]
        deflated = sum(max(a - b, 0) for (_, a), (_, b) in itertools.pairwise([(0.0, 0), *actual_log]))
        assert deflated > 2 * 1024 * 256  # over 2 GiB given back, in two deflates
        assert sum(p for _, p in given_back) > 0.9 * deflated
        assert len([p for _, p in given_back if p]) > 3  # the stats timer and the ticks cut the runs


def test_a_reinflate_takes_the_frames_given_back_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inflate 2 GiB, deflate 1.5 GiB, inflate 1 GiB again: the second inflate's runs
    take the frames the deflate gave back (most recent first, as ``alloc_pages``) and
    the result is the per-request path's."""
    taken = counted_runs(monkeypatch, "fill_run")
    plan = Plan(4, 300, 200, False, False, False, 1, ((0.0, 2048), (3.0, 3584), (5.0, 2560)), 0.5)
    fast = run(plan, at_once=True)
    assert fast == run(plan, at_once=False)
    assert sum(p for t, p in taken if t >= 5.0) > 0.9 * 1024 * 256
    assert fast["mm"][-1] == (1536 - 1024) * 256  # type: ignore[index]  # given back, not yet reused
