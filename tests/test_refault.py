"""Page cache is not free to drop: hot file data a balloon or reclaim takes away is read
again (refaults, counted as major faults) and cached again where there is room; cold
data and free memory cost nothing (``sim.memory.guest``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.memory.guest import Fleet, GuestModelParams, GuestSpec
from sim.memory.hypervisor import SimHypervisor

MIB = 1024
GIB = 1024 * MIB


def reader(swap_kib: int = 0) -> SimHypervisor:
    """A 4 GiB guest holding 1 GiB of working set, nothing hot yet."""
    spec = GuestSpec(uuid="u", name="g", ram_kib=4 * GIB, swap_kib=swap_kib)
    return SimHypervisor([spec], host_mem_kib=16 * GIB, initial_demand_kib=np.array([1.0 * GIB]))


def run(hv: SimHypervisor, seconds: float, read_mib_s: float = 0.0, step_s: float = 10.0) -> None:
    for _ in range(int(seconds / step_s)):
        hv.advance(hv.now_s + step_s, np.array([1.0 * GIB]), np.array([read_mib_s * MIB]))


def squeeze_and_give_back(hv: SimHypervisor, target_kib: int) -> float:
    """Balloon to ``target_kib`` for one tick, then give everything back and let 10 min
    pass; returns the page cache right after the squeeze."""
    hv.set_target("u", target_kib)
    run(hv, 10)
    squeezed_cache_kib = float(hv.fleet.cache[0])
    hv.set_target("u", 4 * GIB)
    run(hv, 600)
    return squeezed_cache_kib


def test_a_squeezed_reader_reads_its_hot_cache_again_and_caches_it_again() -> None:
    hv = reader()
    run(hv, 1200, read_mib_s=0.5)  # 600 MiB read into free memory: hot
    f = hv.fleet
    hot_kib, cold_kib = float(f.hot_cache[0]), float(f.cache[0] - f.hot_cache[0])
    assert 450 * MIB < hot_kib < 600 * MIB  # cooled a little over the 20 min
    squeezed_cache_kib = squeeze_and_give_back(hv, int(1.3 * GIB))
    assert squeezed_cache_kib < 0.25 * (hot_kib + cold_kib)  # the balloon took most of it
    kept_hot_kib = min(hot_kib, squeezed_cache_kib)  # the cold went first
    lost_kib = hot_kib - kept_hot_kib
    refault_kib = float(f.refault_kib[0])
    assert refault_kib == pytest.approx(lost_kib, rel=0.01)  # all of it read again in 10 min
    assert float(f.major_faults[0]) == pytest.approx(refault_kib / 4)  # no swap: all refaults
    regrown_kib = float(f.cache[0]) - squeezed_cache_kib
    assert 0.5 * refault_kib < regrown_kib <= refault_kib + 1  # the first tick's found no room
    cooled = np.exp(-610 / GuestModelParams().cache_reuse_s)  # at most
    assert cooled * (kept_hot_kib + regrown_kib) < float(f.hot_cache[0]) <= kept_hot_kib + regrown_kib  # hot again


def test_a_balloon_that_takes_only_free_memory_costs_no_refaults() -> None:
    hv = reader()
    run(hv, 1200, read_mib_s=0.5)
    f = hv.fleet
    cache_kib = float(f.cache[0])
    spare_free_kib = float(f.free()[0] - f.min_free[0])
    squeeze_and_give_back(hv, int(4 * GIB - spare_free_kib + 16 * MIB))
    assert float(f.cache[0]) == cache_kib  # untouched
    assert float(f.refault_kib[0]) == 0.0 and float(f.major_faults[0]) == 0.0


def test_cold_cache_costs_almost_nothing_to_drop() -> None:
    hv = reader()
    run(hv, 1200, read_mib_s=0.5)
    run(hv, 36000, step_s=600)  # ten hours idle: ten times cache_reuse_s
    squeeze_and_give_back(hv, int(1.3 * GIB))
    assert float(hv.fleet.refault_kib[0]) < 1 * MIB


def test_guests_start_with_the_minimum_cache_made_hot_by_the_first_read_rate() -> None:
    """No invented cache: a guest boots with its minimum page cache; the replay passes
    the trace's first read rate, whose window (rate x cache_reuse_s) makes it hot."""
    params = GuestModelParams()
    specs = [GuestSpec(uuid=f"u{i}", name=f"g{i}", ram_kib=4 * GIB) for i in range(3)]
    demand = np.full(3, 1.0 * GIB)
    fleet = Fleet(specs, params, demand, initial_read_kib_s=np.array([0.0, 0.001 * MIB, 100.0 * MIB]))
    assert fleet.cache.tolist() == fleet.cache_min.tolist()
    assert fleet.hot_cache.tolist() == [0.0, 0.001 * MIB * params.cache_reuse_s, fleet.cache[2]]
    assert Fleet(specs, params, demand).hot_cache.tolist() == [0.0] * 3


step = st.tuples(
    st.floats(0.3, 3.6),  # working set, GiB
    st.floats(0.0, 20.0),  # file reads, MiB/s
    st.floats(0.5, 4.0),  # balloon target, GiB
    st.sampled_from([1.0, 10.0, 60.0]),  # tick, s
)


@settings(max_examples=40, deadline=None)
@given(st.lists(step, min_size=1, max_size=25), st.sampled_from([0, GIB]))
def test_hot_cache_stays_within_the_cache_and_the_debt_is_never_negative(
    steps: list[tuple[float, float, float, float]], swap_kib: int
) -> None:
    hv = reader(swap_kib)
    f = hv.fleet
    for demand_gib, read_mib_s, target_gib, dt_s in steps:
        hv.set_target("u", int(target_gib * GIB))
        hv.advance(hv.now_s + dt_s, np.array([demand_gib * GIB]), np.array([read_mib_s * MIB]))
        assert 0.0 <= float(f.hot_cache[0]) <= float(f.cache[0]) + 1e-6
        assert float(f.refault_debt[0]) >= 0.0 and float(f.refault_kib[0]) >= 0.0


def test_reads_with_no_free_room_still_make_the_cache_hot() -> None:
    """A guest squeezed to its low watermark keeps reading: its new reads replace cold
    cache (the LRU), so what it holds is hot and a further squeeze costs refaults."""
    hv = reader()
    hv.set_target("u", int(1.2 * GIB))  # below what the guest needs: the balloon stops at the watermark
    run(hv, 60)
    f = hv.fleet
    assert float(f.free()[0] - f.min_free[0]) < MIB and float(f.hot_cache[0]) == 0.0
    run(hv, 1200, read_mib_s=0.5)
    assert float(f.hot_cache[0]) == pytest.approx(float(f.cache[0]))


def test_refaults_of_the_guests_own_growth_with_no_balloon_are_its_workloads() -> None:
    """The same hot cache evicted twice: by the guest's own growth with its balloon empty
    (the workload's paging, which a dedicated host sees too) and by a balloon. Both are
    refaults; only the second is overcommit's (``own_refault_kib`` tells them apart)."""
    own, squeezed = reader(), reader()
    for hv in (own, squeezed):
        run(hv, 1200, read_mib_s=0.5)  # ~550 MiB of hot cache
    for _ in range(60):  # the workload grows to what the guest holds unballooned
        own.advance(own.now_s + 10.0, np.array([3.7 * GIB]), np.zeros(1))
    squeeze_and_give_back(squeezed, int(1.3 * GIB))
    assert float(own.fleet.refault_kib[0]) > 300 * MIB
    assert float(own.fleet.own_refault_kib[0]) == pytest.approx(float(own.fleet.refault_kib[0]), rel=1e-6)
    assert float(squeezed.fleet.refault_kib[0]) > 300 * MIB and float(squeezed.fleet.own_refault_kib[0]) == 0.0
