"""The simulated host: the clock, the guest memory model and its balloon, read through
the same snapshots the daemon reads."""

from __future__ import annotations

import numpy as np
import pytest

from sim.memory.guest import OOM_STEP_KIB, GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.device import num_pages_kib
from sim.virtio.world import World

GIB = 1024 * 1024


def test_world_orders_by_time_then_urgency_then_scheduling() -> None:
    world, log = World(), []
    world.schedule(lambda: log.append((world.now_s, "late")), 2.0)
    world.schedule(lambda: log.append((world.now_s, "normal")), 1.0)
    world.schedule(lambda: log.append((world.now_s, "interrupt")), 1.0, urgent=True)
    world.schedule(lambda: log.append((world.now_s, "normal-2")), 1.0)
    world.run(until_s=5.0)
    assert log == [(1.0, "interrupt"), (1.0, "normal"), (1.0, "normal-2"), (2.0, "late")]
    assert world.now_s == 5.0


def test_every_repeats_on_its_period() -> None:
    world, log = World(), []
    world.every(2.0, lambda: log.append(world.now_s), first_s=2.0)
    world.run(until_s=7.0)
    assert log == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match=r"delay_s\(=-1\)"):
        world.schedule(lambda: None, -1)


def one_guest(
    *, doo: bool = False, reporting: bool = False, demand_gib: float = 1.0, swap_kib: int = 0
) -> SimHypervisor:
    spec = GuestSpec(uuid="u", name="g", ram_kib=4 * GIB, swap_kib=swap_kib, deflate_on_oom=doo, reporting=reporting)
    return SimHypervisor([spec], host_mem_kib=16 * GIB, initial_demand_kib=np.array([demand_gib * GIB]))


def run(hv: SimHypervisor, seconds: float, demand_gib: float, step_s: float = 10.0) -> None:
    for _ in range(int(seconds / step_s)):
        hv.advance(hv.now_s + step_s, np.array([demand_gib * GIB]), np.zeros(1))


def test_num_pages_truncates_to_whole_pages_like_qemu() -> None:
    assert num_pages_kib(4 * GIB, 4 * GIB - 10) == 8.0
    assert num_pages_kib(4 * GIB, 8 * GIB) == 0.0


@pytest.mark.parametrize("doo", [False, True])
def test_memtotal_shrinks_with_the_balloon_only_without_deflate_on_oom(doo: bool) -> None:
    hv = one_guest(doo=doo)
    before = hv.snapshot()[0].stats
    hv.set_target("u", 3 * GIB)
    run(hv, 10, demand_gib=1.0)
    g = hv.snapshot()[0]
    assert g.actual_kib == 3 * GIB
    assert before is not None and g.stats is not None
    assert before.mem_total_kib is not None and g.stats.mem_total_kib is not None
    shrink = before.mem_total_kib - g.stats.mem_total_kib
    assert shrink == (0 if doo else GIB)
    assert g.stats.mem_free_kib is not None and before.mem_free_kib is not None
    assert g.stats.mem_free_kib < before.mem_free_kib  # MemFree drops either way


def test_inflation_returns_touched_memory_to_the_host() -> None:
    """The guest touched 3 GiB and freed 2 GiB of it (guests start with no invented
    cache: only memory they used costs the host); the balloon takes those back."""
    hv = one_guest(demand_gib=3.0)
    run(hv, 10, demand_gib=1.0)
    used_before = hv.host_used_kib()
    hv.set_target("u", 2 * GIB)
    run(hv, 10, demand_gib=1.0)
    assert hv.host_used_kib() < used_before - 0.5 * GIB


def test_an_unreachable_target_stops_short_and_burns_out_of_puff_retries() -> None:
    hv = one_guest(demand_gib=3.0)
    hv.set_target("u", 1 * GIB)
    run(hv, 30, demand_gib=3.0)
    g = hv.snapshot()[0]
    assert g.actual_kib > 3 * GIB  # the working set stays resident
    assert hv.fleet.driver.puff_retries[0] == 3 * 50  # 200 ms retries for 30 s
    assert hv.fleet.oom_kills[0] == 0


def test_deflate_on_oom_gives_back_1_mib_steps_and_does_not_reinflate() -> None:
    hv = one_guest(doo=True, demand_gib=1.0)
    hv.set_target("u", 2 * GIB)
    run(hv, 10, demand_gib=1.0)
    run(hv, 10, demand_gib=2.5)  # the workload jumps past what the balloon leaves
    g = hv.snapshot()[0]
    assert g.actual_kib > 2 * GIB and (g.actual_kib - 2 * GIB) % OOM_STEP_KIB == 0
    assert hv.fleet.oom_deflates[0] == (g.actual_kib - 2 * GIB) // OOM_STEP_KIB
    assert hv.fleet.oom_kills[0] == 0
    run(hv, 60, demand_gib=1.0)  # demand falls: the balloon stays deflated
    assert hv.snapshot()[0].actual_kib == g.actual_kib
    hv.set_target("u", 2 * GIB)  # until the host says so again
    run(hv, 10, demand_gib=1.0)
    assert hv.snapshot()[0].actual_kib == 2 * GIB


def test_without_deflate_on_oom_or_swap_a_workload_that_does_not_fit_is_killed_each_time_it_restarts() -> None:
    """The killed workload restarts at the next interval and asks for its demand again:
    each of the 6 intervals kills it again, frees its memory (once reaped, at the next
    interval), and leaves its demand unserved."""
    hv = one_guest(demand_gib=1.0)
    hv.set_target("u", 2 * GIB)
    run(hv, 10, demand_gib=1.0)
    run(hv, 60, demand_gib=2.5)
    assert hv.fleet.oom_kills[0] == 6
    assert hv.fleet.reaping[0] and hv.fleet.unserved_kib[0] == 2.5 * GIB and hv.fleet.degraded[0]
    run(hv, 10, demand_gib=0.0)  # reaped; the trace says the workload is gone
    assert hv.fleet.anon[0] == 0 and not hv.fleet.reaping[0] and hv.fleet.oom_kills[0] == 6
    run(hv, 10, demand_gib=1.0)  # it fits again: back, served
    assert hv.fleet.oom_kills[0] == 6 and hv.fleet.anon[0] == GIB and hv.fleet.unserved_kib[0] == 0


def test_the_sample_after_a_kill_shows_the_guest_exhausted_and_the_next_one_the_collapse() -> None:
    """Issue 16: the 6.1 guest's victim is reaped asynchronously (mm/oom_kill.c
    oom_reaper, exit_mmap()); the real test guest's first sample after the kill still
    showed it, MemAvailable near 0, and the next its idle use. A policy without the
    OOM-kill stat infers the kill from exactly that (policies.signals.oom_inferred)."""
    hv = one_guest(demand_gib=0.5)
    hv.set_target("u", 2 * GIB)
    run(hv, 10, demand_gib=0.5, step_s=5.0)
    run(hv, 5, demand_gib=2.5, step_s=5.0)  # killed at the end of this interval
    assert hv.fleet.oom_kills[0] == 1
    run(hv, 5, demand_gib=0.0, step_s=5.0)  # the samples of this interval
    stats = hv.snapshot()[0].stats
    assert stats is not None and stats.mem_available_kib is not None
    assert stats.mem_available_kib < 0.02 * 2 * GIB  # exhausted: the victim still resident
    run(hv, 5, demand_gib=0.0, step_s=5.0)
    stats = hv.snapshot()[0].stats
    assert stats is not None and stats.mem_available_kib is not None
    assert stats.mem_available_kib > GIB  # reaped: its memory is free again


def test_swap_absorbs_a_spike_and_swaps_back_in_when_there_is_room() -> None:
    hv = one_guest(demand_gib=1.0, swap_kib=GIB)
    hv.set_target("u", 2 * GIB)
    run(hv, 10, demand_gib=1.0)
    run(hv, 60, demand_gib=2.2)
    assert hv.fleet.swap[0] > 0 and hv.fleet.oom_kills[0] == 0
    hv.set_target("u", 4 * GIB)
    run(hv, 600, demand_gib=2.2)
    assert hv.fleet.swap[0] < 1024 and hv.fleet.swap_in[0] > 0


def test_free_page_reporting_returns_freed_memory_without_a_balloon() -> None:
    plain, reporting = one_guest(demand_gib=3.0), one_guest(demand_gib=3.0, reporting=True)
    for hv in (plain, reporting):
        run(hv, 60, demand_gib=1.0)  # the workload frees 2 GiB
    assert reporting.host_used_kib() < plain.host_used_kib() - 1.5 * GIB


def test_stats_arrive_on_the_polling_period_with_last_update() -> None:
    hv = one_guest()
    seen = []
    for _ in range(12):
        hv.advance(hv.now_s + 1.0, np.array([1.0 * GIB]), np.zeros(1))
        stats = hv.snapshot()[0].stats
        assert stats is not None
        seen.append(stats.last_update_s)
    # QEMU's timer fires every 5 s; the guest answers a moment later (its stats work
    # item), so a sample stamped 5 s (last-update is whole seconds) is there from 6 s on.
    assert seen == [0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10]
